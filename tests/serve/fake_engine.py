"""A deterministic stand-in engine for developing the service before the real one lands."""

from __future__ import annotations

import time

from PIL import Image

from malerei.engine.errors import Cancelled
from malerei.serve.jobs.engine import EngineImage, EngineResult, unsupported


class FakeEngine:
    def __init__(self, settings=None, step_s: float = 0.02) -> None:
        self.step_s = step_s
        self.calls = []

    def run_batch(self, requests, on_progress, is_cancelled):
        self.calls.append([r.job_id for r in requests])
        results = [unsupported(r) for r in requests if r.kind != "txt2img"]
        runnable = [r for r in requests if r.kind == "txt2img"]
        if not runnable:
            return results
        steps = runnable[0].params["steps"]
        for i in range(steps):
            if is_cancelled():
                raise Cancelled("cancelled")
            time.sleep(self.step_s)
            on_progress(i + 1, steps, Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)))
        for r in runnable:
            p = r.params
            imgs = [EngineImage(image=Image.new("RGB", (p["width"], p["height"]), (p["seed"] % 255, 1, 2)),
                                seed=p["seed"] + k, infotext=f"{p['prompt']}\nSteps: {steps}, Seed: {p['seed'] + k}",
                                recipe={"prompt": p["prompt"]}) for k in range(p["batch_size"])]
            results.append(EngineResult(job_id=r.job_id, images=imgs))
        return results


def factory(settings):
    return FakeEngine(settings)
