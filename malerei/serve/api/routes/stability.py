"""stability-compatible API (to come)."""

from fastapi import APIRouter

router = APIRouter()
