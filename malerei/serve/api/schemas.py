"""API response and request bodies of the native routes (tables live in ``db.models``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ImagePublic(BaseModel):
    id: str
    job_id: str
    index: int
    seed: int
    width: int
    height: int
    prompt: str
    infotext: str
    created_at: float
    url: str


class Progress(BaseModel):
    step: int
    total: int


class JobError(BaseModel):
    code: str
    message: str | None


class WebhookState(BaseModel):
    url: str
    status: str
    attempts: int


class JobPublic(BaseModel):
    id: str
    object: str = "job"
    kind: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    model: str | None
    params: dict[str, Any]
    cost: int
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: Progress
    cancel_requested: bool
    error: JobError | None
    images: list[ImagePublic]
    webhook: WebhookState | None


class JobList(BaseModel):
    jobs: list[JobPublic]


class ImageList(BaseModel):
    images: list[ImagePublic]
    next_cursor: str | None = Field(None, description="pass as 'cursor' for the next page")


class Login(BaseModel):
    username: str = Field(..., max_length=64)
    password: str = Field(..., max_length=1024)


class UserPublic(BaseModel):
    name: str
    is_admin: bool
    balance: int


class KeyCreate(BaseModel):
    name: str = Field("", max_length=128)


class KeyPublic(BaseModel):
    id: str
    name: str
    created_at: float
    revoked: bool


class KeyCreated(KeyPublic):
    key: str = Field(description="the full API key; shown only now")


class KeyList(BaseModel):
    keys: list[KeyPublic]


class WebhookSecret(BaseModel):
    secret: str
    header: str
    scheme: str


class LedgerEntry(BaseModel):
    delta: int
    reason: str
    job_id: str | None
    note: str
    created_at: float


class CreditsPublic(BaseModel):
    balance: int
    entries: list[LedgerEntry]


class UserCreate(BaseModel):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    password: str | None = Field(None, min_length=8, max_length=1024)
    is_admin: bool = False


class CreditGrant(BaseModel):
    amount: int = Field(..., ge=-10**12, le=10**12)
    note: str = Field("", max_length=255)


class ModelPublic(BaseModel):
    name: str
    title: str
    defaults: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelPublic]
    samplers: list[str]
    schedulers: list[str]


class Health(BaseModel):
    status: str
    database: str
    queue: str  # "ok" | "error": the Redis queue when one is configured, else the database's
    queue_depth: int
