"""Service settings: one dataclass, built by the CLI (or tests) and passed down explicitly."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from malerei.engine.errors import MalereiError


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ConfigError(MalereiError, ValueError):
    """The settings cannot work together (e.g. a public address without authentication)."""


@dataclass(kw_only=True)
class Settings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    # Identity comes only from verified credentials; off only for a loopback-only single user.
    auth: bool = True
    # Where user models live (besides the built-in one). None: <data_dir>/models.
    models_dir: Path | None = None
    # The model of jobs that name none. None: the built-in model (else the first one found).
    default_model: str | None = None
    # SQLAlchemy URL; None: SQLite file <data_dir>/malerei.db (WAL). PostgreSQL:
    # postgresql://user:password@host/db (driven by psycopg 3) for API servers and workers on
    # several machines.
    database_url: str | None = None
    # The job queue: None or "sql" (claims through the database), or a Redis URL
    # (redis://host:6379/0, rediss://, unix://): Redis carries the queue, the leases and the
    # wake-ups, and the rate limits are shared by every API server using it.
    queue_url: str | None = None
    redis_prefix: str = "malerei:"         # Redis key prefix: several deployments can share one Redis
    # Run a worker thread inside the server process (a separate `malerei worker` may run too).
    in_process_worker: bool = True
    # Where and in what precision the worker runs models (None: the engine's choice, fp16 on GPUs
    # and fp32 on CPUs). `--set dtype=bf16` on a CPU with native bf16 (AVX512-BF16, AMX) makes
    # batches much cheaper (bench/serve.py --dtype bf16).
    device: str | None = None
    dtype: str | None = None

    # --- limits (bad input answers 4xx, never a crash) ---
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 1024 * 1024          # width * height of one image
    max_steps: int = 150
    max_batch: int = 8                     # images per job
    max_upload_bytes: int = 25 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096    # decoded size of an uploaded image
    max_queued_per_user: int = 32          # queued + running jobs per user
    rate_limit_per_minute: int = 600       # requests per API key (or session) per minute
    rate_limit_burst: int = 120
    sync_timeout_s: float = 600.0          # how long compatible (synchronous) APIs wait

    # --- credits ---
    credits_enabled: bool = True
    # A job costs ceil(images * width * height * steps / credit_unit), at least 1.
    credit_unit: int = 512 * 512 * 10

    # --- worker ---
    lease_s: float = 15.0                  # a worker that misses heartbeats this long is dead
    max_attempts: int = 3                  # worker deaths before a job is failed
    batch_max: int = 8                     # jobs per UNet call
    batch_window_s: float = 0.05           # wait this long for company when the queue is short
    preview_every_s: float = 0.3           # at most one preview image per this interval
    poll_s: float = 0.1                    # idle worker polls the queue this often

    # --- webhooks ---
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 6
    webhook_backoff_s: float = 2.0         # doubled after every failed try
    webhook_allow_private: bool = False    # allow webhooks to loopback/private addresses

    session_max_age_s: int = 14 * 24 * 3600
    secret_key: str = field(default="", repr=False)  # signs image URLs; read from data dir if empty

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.models_dir is not None:
            self.models_dir = Path(self.models_dir)
        from malerei.engine.devices import DEVICE_NAMES, DTYPE_NAMES

        if self.dtype is not None and self.dtype.lower() not in ("auto", *DTYPE_NAMES):
            raise ConfigError(f"dtype {self.dtype!r}: expected one of auto, {', '.join(DTYPE_NAMES)}")
        if self.device is not None and self.device.split(":")[0].lower() not in DEVICE_NAMES:
            raise ConfigError(f"device {self.device!r}: expected one of {', '.join(DEVICE_NAMES)} (cuda:N too)")

    # ----------------------------------------------------------------- derived paths
    @property
    def db_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'malerei.db'}"
        # SQLAlchemy's default PostgreSQL driver is psycopg2; malerei installs psycopg 3
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain):]
        return url

    @property
    def redis_url(self) -> str | None:
        """The Redis URL when the queue is Redis-backed, else None."""
        if self.queue_url in (None, "", "sql"):
            return None
        return self.queue_url

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def inputs_dir(self) -> Path:
        return self.data_dir / "inputs"

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    def check(self) -> None:
        """Fail fast on settings that cannot be served safely."""
        if not self.auth and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to bind {self.host!r} with authentication off: anyone who can reach "
                "that address could use this server. Bind 127.0.0.1 (the default) or turn "
                "authentication on (drop --no-auth)."
            )
        if not (0 < self.port < 65536):
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        check_queue_url(self.queue_url)

    def prepare_dirs(self) -> None:
        for path in (self.data_dir, self.images_dir, self.inputs_dir):
            path.mkdir(parents=True, exist_ok=True)
        if not self.secret_key:
            self.secret_key = load_or_create_secret(self.data_dir / "secret_key")


QUEUE_SCHEMES = ("redis://", "rediss://", "unix://")


def check_queue_url(url: str | None) -> None:
    if url in (None, "", "sql") or url.startswith(QUEUE_SCHEMES):
        return
    raise ConfigError(f"queue {url!r} is not understood: use 'sql' (the database, the default) or a Redis URL "
                      f"starting with {', '.join(QUEUE_SCHEMES)}")


def load_or_create_secret(path: Path) -> str:
    """A random secret kept in the data dir (mode 600), created on first use.

    Written to a temporary file and hard-linked into place, so two processes starting at once
    agree on one secret and neither reads a half-written file.
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32))
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


_SETTABLE = {"int": int, "float": float, "bool": None, "str": str}


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["max_batch=4", "auth=false"]`` -> typed Settings fields; unknown names are refused."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    out: dict[str, object] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in fields or name in ("data_dir", "secret_key"):
            allowed = ", ".join(sorted(n for n in fields if n not in ("data_dir", "secret_key")))
            raise ConfigError(f"--set {item!r}: expected NAME=VALUE with NAME one of: {allowed}")
        kind = str(fields[name].type).split("|")[0].strip()
        try:
            if kind == "bool":
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("1", "true", "yes", "on")
            elif kind in ("int", "float"):
                out[name] = int(raw) if kind == "int" else float(raw)
            elif kind == "Path":
                out[name] = Path(raw)
            else:
                out[name] = raw
        except ValueError:
            raise ConfigError(f"--set {item!r}: {name} must be a {kind}") from None
    return out
