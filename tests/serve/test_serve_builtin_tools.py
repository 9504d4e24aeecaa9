"""The shipped shapes-world upscaler and restorer through the service: listed for the web page,
preselected, and used by upscale / restore jobs that name no model."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from serving import new_account, wait_job


def _png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _done(client, headers, body: dict) -> tuple[dict, Image.Image]:
    job = client.post("/v1/jobs", json=body, headers=headers)
    assert job.status_code == 202, job.text
    done = wait_job(client, job.json()["id"], headers)
    assert done["status"] == "succeeded", done
    image = Image.open(io.BytesIO(client.get(done["images"][0]["url"], headers=headers).content)).convert("RGB")
    return done, image


def test_builtin_tools_are_listed_and_preselected(served):
    server, client, _ = served
    user = new_account(server, "tools")
    tools = client.get("/v1/web/tools", headers=user.headers).json()
    assert {"shapes-x4", "4x-Tiny"} <= set(tools["upscalers"]) and tools["default_upscaler"] == "shapes-x4"
    assert {"shapes-restore", "tiny-restore"} <= set(tools["restorers"])
    assert tools["default_restorer"] == "shapes-restore"


def test_jobs_without_a_model_use_the_builtin_ones(served):
    """Trained models, not just files: each beats its baseline on a shapes-world scene it never saw."""
    from malerei.train.restorer import degrade
    from malerei.train.upscaler import psnr, unseen_scenes
    from malerei.world.render import render

    server, client, _ = served
    user = new_account(server, "builtin")
    scene = unseen_scenes(400)[201]
    low, truth = render(scene, 64), render(scene, 256)
    done, out = _done(client, user.headers, {"kind": "upscale", "image": _png_b64(Image.fromarray(low)), "scale": 4})
    assert out.size == (256, 256) and done["params"]["upscaler"] == "shapes-x4"
    bicubic = np.asarray(Image.fromarray(low).resize((256, 256), Image.Resampling.BICUBIC))
    assert psnr(np.asarray(out), truth) > psnr(bicubic, truth) + 1.0

    clean = render(scene, 128)
    bad = degrade(clean, np.random.default_rng(11))
    done, out = _done(client, user.headers, {"kind": "restore", "image": _png_b64(Image.fromarray(bad))})
    assert out.size == (128, 128) and done["params"]["restorer"] == "shapes-restore"
    assert psnr(np.asarray(out), clean) > psnr(bad, clean) + 1.0
