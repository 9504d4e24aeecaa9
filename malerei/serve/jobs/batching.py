"""Which jobs may share one UNet call.

Jobs of the same kind, model, size, sampler, schedule and step count follow the same timestep
schedule on latents of the same shape, so their latents can be stacked into one batch; prompts,
seeds and guidance scales may differ. The worker claims the oldest queued job and then every
queued job with the same key, up to ``batch_max``; when the queue is short it waits
``batch_window_s`` for company first (longer while company keeps arriving, up to four windows),
so concurrent users share calls.
"""

from __future__ import annotations

from typing import Any

BATCHABLE_KINDS = ("txt2img",)


def batch_key(*, job_id: str, kind: str, model: str, params: dict[str, Any]) -> str:
    if kind not in BATCHABLE_KINDS:
        return f"solo|{job_id}"
    parts = (kind, model, f"{params['width']}x{params['height']}", params["sampler"], params["scheduler"],
             str(params["steps"]))
    return "|".join(parts)
