"""The compatible APIs end to end: OpenAI Images, A1111 /sdapi/v1, Stability v1 (real generation)."""

from __future__ import annotations

import base64
import io
import json

import httpx
from PIL import Image

from serving import TINY_MODEL, new_account
from malerei.serve.jobs.engine import supported_kinds


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_b64(size=(64, 64), mode="RGB", color=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- OpenAI
def test_openai_generations_b64_and_url(served):
    server, client, _ = served
    user = new_account(server, "oai")
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "64x64",
                                                     "response_format": "b64_json", "model": "dall-e-2"},
                    headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert decode(body["data"][0]["b64_json"]).size == (64, 64)

    r = client.post("/v1/images/generations", json={"prompt": "a blue square", "size": "64x64", "model": TINY_MODEL},
                    headers=user.headers)
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://127.0.0.1")
    fetched = httpx.get(url)  # no credentials: the URL is signed
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert fetched.headers["x-content-type-options"] == "nosniff"
    # the images are in the user's gallery too
    assert len(client.get("/v1/images", headers=user.headers).json()["images"]) == 3


def test_openai_error_shape(served):
    server, client, _ = served
    r = client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-nope"})
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    user = new_account(server, "oaierr", credits=0)
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=user.headers)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"
    r = client.post("/v1/images/generations", json={"prompt": "x", "model": "unknown-model"}, headers=user.headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_edits(served):
    server, client, _ = served
    user = new_account(server, "oaiedit")
    rgba = png_b64(mode="RGBA", color=(0, 0, 0, 0))
    r = client.post("/v1/images/edits", files={"image": ("in.png", rgba, "image/png")},
                    data={"prompt": "a red circle", "response_format": "b64_json"}, headers=user.headers)
    if "inpaint" in supported_kinds():
        assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).size == (64, 64)
    else:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "unsupported_kind" and "not supported" in r.json()["error"]["message"]
        assert client.get("/v1/account", headers=user.headers).json()["balance"] == 1000  # refunded


# ----------------------------------------------------------------------------- A1111
def test_a1111_txt2img_and_friends(served):
    server, client, _ = served
    user = new_account(server, "a1111")
    h = user.headers
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a green triangle", "negative_prompt": "blue", "seed": 7,
                                               "steps": 3, "width": 64, "height": 64, "batch_size": 2,
                                               "sampler_name": "Euler a", "cfg_scale": 5, "unknown_field": 1},
                    headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and decode(body["images"][0]).size == (64, 64)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "Euler a" and info["steps"] == 3
    assert "Steps: 3" in info["infotexts"][0]

    pnginfo = client.post("/sdapi/v1/png-info", json={"image": body["images"][0]}, headers=h).json()
    assert pnginfo["info"].startswith("a green triangle")
    assert str(pnginfo["parameters"].get("Steps")) == "3" and str(pnginfo["parameters"].get("Seed")) == "7"

    samplers = client.get("/sdapi/v1/samplers", headers=h).json()
    assert "Euler" in [s["name"] for s in samplers]
    models = client.get("/sdapi/v1/sd-models", headers=h).json()
    assert TINY_MODEL in [m["model_name"] for m in models]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": TINY_MODEL}, headers=h).status_code == 200
    assert client.get("/sdapi/v1/options", headers=h).json()["sd_model_checkpoint"].startswith(TINY_MODEL)
    bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, headers=h)
    assert bad.status_code == 404 and set(bad.json()) == {"error", "detail", "body", "errors"}

    progress = client.get("/sdapi/v1/progress", headers=h).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt", headers=h).status_code == 200


def test_a1111_progress_and_interrupt_of_a_running_job(served):
    server, client, _ = served
    user = new_account(server, "a1111p")
    h = user.headers
    job = client.post("/v1/jobs", json={"prompt": "slow", "width": 64, "height": 64, "steps": 150}, headers=h).json()
    for _ in range(600):
        p = client.get("/sdapi/v1/progress", headers=h).json()
        if p["state"]["sampling_step"] > 0:
            break
    assert p["state"]["job"] == job["id"] and 0 < p["progress"] <= 1 and p["state"]["sampling_steps"] == 150
    assert client.post("/sdapi/v1/interrupt", headers=h).status_code == 200
    for _ in range(600):
        state = client.get(f"/v1/jobs/{job['id']}", headers=h).json()
        if state["status"] != "running":
            break
    assert state["status"] == "cancelled"


def test_a1111_img2img(served):
    server, client, _ = served
    user = new_account(server, "a1111i")
    r = client.post("/sdapi/v1/img2img", json={"init_images": [base64.b64encode(png_b64()).decode()],
                                               "prompt": "a red circle", "steps": 3, "denoising_strength": 0.5},
                    headers=user.headers)
    if "img2img" in supported_kinds():
        assert r.status_code == 200 and len(r.json()["images"]) == 1
    else:
        assert r.status_code == 400 and r.json()["error"] == "unsupported_kind"


# ----------------------------------------------------------------------------- Stability
def test_stability_text_to_image(served):
    server, client, _ = served
    user = new_account(server, "stab")
    h = user.headers
    engines = client.get("/v1/engines/list", headers=h).json()
    assert TINY_MODEL in [e["id"] for e in engines] and engines[0]["type"] == "PICTURE"
    body = {"text_prompts": [{"text": "a red circle", "weight": 1}, {"text": "blue", "weight": -1}],
            "width": 64, "height": 64, "steps": 3, "samples": 2, "seed": 11, "sampler": "K_EULER"}
    r = client.post(f"/v1/generation/{TINY_MODEL}/text-to-image", json=body, headers=h)
    assert r.status_code == 200, r.text
    artifacts = r.json()["artifacts"]
    assert [a["seed"] for a in artifacts] == [11, 12]
    assert all(a["finishReason"] == "SUCCESS" for a in artifacts)
    assert decode(artifacts[0]["base64"]).size == (64, 64)
    raw = client.post(f"/v1/generation/{TINY_MODEL}/text-to-image", json={**body, "samples": 1},
                      headers={**h, "Accept": "image/png"})
    assert raw.headers["content-type"] == "image/png" and raw.headers["finish-reason"] == "SUCCESS"
    assert raw.headers["seed"] == "11"
    missing = client.post("/v1/generation/no-such-engine/text-to-image", json=body, headers=h)
    assert missing.status_code == 404 and set(missing.json()) == {"id", "name", "message"}
    unauth = client.post(f"/v1/generation/{TINY_MODEL}/text-to-image", json=body)
    assert unauth.status_code == 401 and unauth.json()["name"] == "unauthorized"
    assert client.get("/v1/user/balance", headers=h).json()["credits"] < 1000


def test_stability_image_to_image_and_masking(served):
    server, client, _ = served
    user = new_account(server, "stabi")
    files = {"init_image": ("x.png", png_b64(), "image/png")}
    data = {"text_prompts[0][text]": "a red circle", "steps": "3", "image_strength": "0.4"}
    r = client.post(f"/v1/generation/{TINY_MODEL}/image-to-image", files=files, data=data, headers=user.headers)
    masked = client.post(f"/v1/generation/{TINY_MODEL}/image-to-image/masking",
                         files={**files, "mask_image": ("m.png", png_b64(color=(255, 255, 255)), "image/png")},
                         data={**data, "mask_source": "MASK_IMAGE_WHITE"}, headers=user.headers)
    for response, kind in ((r, "img2img"), (masked, "inpaint")):
        if kind in supported_kinds():
            assert response.status_code == 200 and response.json()["artifacts"][0]["finishReason"] == "SUCCESS"
        else:
            assert response.status_code == 400, response.text
            assert set(response.json()) == {"id", "name", "message"} and "not supported" in response.json()["message"]
    no_prompt = client.post(f"/v1/generation/{TINY_MODEL}/image-to-image", files=files, data={}, headers=user.headers)
    assert no_prompt.status_code == 400
