"""Native jobs API end to end over HTTP: submit, progress events, result, gallery, cancel."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from PIL import Image

from serving import Server, WorkerProcess, make_account, model_args, wait_job

TINY = {"width": 64, "height": 64, "steps": 4}


def test_txt2img_job_runs_and_stores_an_image_with_metadata(deployed):
    server, client, accounts = deployed
    alice = accounts["alice"]
    before = client.get("/v1/account", headers=alice.headers).json()["balance"]
    r = client.post("/v1/jobs", json={"prompt": "a red circle", **TINY, "seed": 42}, headers=alice.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and len(job["id"]) > 20
    done = wait_job(client, job["id"], alice.headers)
    assert done["status"] == "succeeded", done
    assert len(done["images"]) == 1 and done["images"][0]["seed"] == 42
    png = client.get(done["images"][0]["url"], headers=alice.headers)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-content-type-options"] == "nosniff"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64)
    assert "a red circle" in image.info["parameters"]
    assert json.loads(image.info["malerei"])
    after = client.get("/v1/account", headers=alice.headers).json()["balance"]
    assert after == before - job["cost"]


def read_events(client, job_id: str, headers: dict) -> list[tuple[str, dict]]:
    """A job's server-sent events, (name, data) each, until the stream ends."""
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_events_stream_progress_and_done(deployed):
    server, client, accounts = deployed
    alice = accounts["alice"]
    job = client.post("/v1/jobs", json={"prompt": "a blue square", "width": 256, "height": 256, "steps": 30},
                      headers=alice.headers).json()
    events = read_events(client, job["id"], alice.headers)
    names = [n for n, _ in events]
    assert names[-1] == "done" and events[-1][1]["status"] == "succeeded"
    assert "state" in names
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps and steps == sorted(steps)
    previews = [d["preview"] for n, d in events if n == "progress" and "preview" in d]
    assert previews and previews[0].startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
    assert max(image.size) <= 64  # low resolution


def test_streams_follow_jobs_that_another_worker_process_runs_on_sqlite(tmp_path, serve_models_dir):
    """An embedded server (SQLite, its own worker) plus a `malerei worker` process: SQLite tells
    the server nothing when that process writes, so the stream of a job it runs must poll fast
    enough to show progress (jobs of the tiny model last well under a second)."""
    alice = make_account(tmp_path, "alice")
    server = Server(data_dir=tmp_path, args=[*model_args(serve_models_dir),
                                             "--set", "rate_limit_per_minute=6000"]).start()
    worker = WorkerProcess(tmp_path, serve_models_dir, 0)
    try:
        worker.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            def follow(size: int) -> tuple[str, list]:
                job = client.post("/v1/jobs", json={"prompt": "a red circle", "width": size, "height": size,
                                                    "steps": 40}, headers=alice.headers).json()
                return job["id"], read_events(client, job["id"], alice.headers)

            elsewhere = []
            for _ in range(6):  # until the other process has run some of them
                with ThreadPoolExecutor(4) as pool:  # four sizes: four batches, two claimers
                    followed = list(pool.map(follow, (160, 192, 224, 256)))
                log = worker.log.read_text(errors="replace")
                for job_id, events in followed:
                    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
                    steps = [d["step"] for n, d in events if n == "progress"]
                    assert steps == sorted(steps), (job_id, events)
                    watched = events[0] == ("state", {"status": "queued"})  # the stream saw it start
                    if job_id in log and watched:
                        elsewhere.append(job_id)
                        # polled once a second (as before) such a job showed one or two progress events
                        assert len(steps) >= 3, (job_id, steps)
                if elsewhere:
                    break
            assert elsewhere, "the worker process never ran a job"
    finally:
        worker.stop()
        server.stop()


def test_gallery_search_download_delete(served):
    server, client, accounts = served
    bob = accounts["bob"]
    a = client.post("/v1/jobs", json={"prompt": "green triangle on sand", **TINY}, headers=bob.headers).json()
    b = client.post("/v1/jobs", json={"prompt": "purple star", **TINY}, headers=bob.headers).json()
    wait_job(client, a["id"], bob.headers)
    wait_job(client, b["id"], bob.headers)
    found = client.get("/v1/images", params={"q": "TRIANGLE sand"}, headers=bob.headers).json()["images"]
    assert [i["job_id"] for i in found] == [a["id"]]
    everything = client.get("/v1/images", params={"limit": 1}, headers=bob.headers).json()
    assert len(everything["images"]) == 1 and everything["next_cursor"]
    page2 = client.get("/v1/images", params={"limit": 1, "cursor": everything["next_cursor"]}, headers=bob.headers)
    assert page2.json()["images"][0]["id"] != everything["images"][0]["id"]
    image_id = found[0]["id"]
    meta = client.get(f"/v1/images/{image_id}", headers=bob.headers).json()
    assert meta["prompt"] == "green triangle on sand"
    assert client.delete(f"/v1/images/{image_id}", headers=bob.headers).status_code == 204
    assert client.get(f"/v1/images/{image_id}", headers=bob.headers).status_code == 404
    assert client.get(f"/v1/images/{image_id}/file", headers=bob.headers).status_code == 404


def test_cancel_running_job_stops_within_one_step_and_refunds(deployed):
    server, client, accounts = deployed
    alice = accounts["alice"]
    before = client.get("/v1/account", headers=alice.headers).json()["balance"]
    # 512 px makes a step of the tiny model slower than the worker's 0.1 s progress updates
    job = client.post("/v1/jobs", json={"prompt": "slow", "width": 512, "height": 512, "steps": 150},
                      headers=alice.headers).json()
    for _ in range(1200):
        state = client.get(f"/v1/jobs/{job['id']}", headers=alice.headers).json()
        if state["status"] == "running" and state["progress"]["step"] >= 2:
            break
        time.sleep(0.05)
    r = client.delete(f"/v1/jobs/{job['id']}", headers=alice.headers)
    assert r.status_code == 200 and r.json()["cancel_requested"]
    step_at_cancel = r.json()["progress"]["step"]
    done = wait_job(client, job["id"], alice.headers)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert step_at_cancel <= done["progress"]["step"] <= step_at_cancel + 1
    assert client.get("/v1/account", headers=alice.headers).json()["balance"] == before
    assert done["images"] == []
    # cancelling again changes nothing
    assert client.delete(f"/v1/jobs/{job['id']}", headers=alice.headers).json()["status"] == "cancelled"


def test_cancel_queued_job_at_once(api_only):
    server, client = api_only
    from serving import new_account

    user = new_account(server, "canceller", credits=50)
    job = client.post("/v1/jobs", json={"prompt": "never", "width": 64, "height": 64, "steps": 2},
                      headers=user.headers).json()
    assert client.get("/v1/account", headers=user.headers).json()["balance"] == 50 - job["cost"]
    cancelled = client.delete(f"/v1/jobs/{job['id']}", headers=user.headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert client.get("/v1/account", headers=user.headers).json()["balance"] == 50


def test_upscale_and_restore(served):
    from serving import new_account

    server, client, _ = served
    user = new_account(server, "post")
    source = Image.new("RGB", (24, 16), (10, 120, 240))
    out = _result(client, user.headers, client.post("/v1/jobs", json={
        "kind": "upscale", "image": _png_b64(source), "scale": 2, "upscaler": "4x-Tiny"}, headers=user.headers))
    assert out.size == (48, 32)
    out = _result(client, user.headers, client.post("/v1/jobs", json={
        "kind": "restore", "image": _png_b64(source), "restorer": "tiny-restore", "strength": 0.0},
        headers=user.headers))
    assert out.size == (24, 16) and np.array_equal(np.asarray(out), np.asarray(source))  # strength 0: the input
    missing = client.post("/v1/jobs", json={"kind": "upscale", "image": _png_b64(source), "upscaler": "nope"},
                          headers=user.headers)
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "upscaler_not_found"
    assert "4x-Tiny" in missing.json()["error"]["message"]


def test_a_kind_the_engine_lacks_fails_clearly(monkeypatch):
    """Unit level: with a kind's engine function missing, the job's result says so."""
    from malerei.serve.jobs import engine

    monkeypatch.setitem(engine.KIND_SUPPORT, "restore", ("malerei.restore.restorer:no_such_function",))
    request = engine.EngineRequest(job_id="job_x", kind="restore", model=None, params={},
                                   images={"image": Image.new("RGB", (8, 8))})
    [result] = engine.RealEngine(catalog=None).run_batch([request], lambda *a: None, lambda: False)
    assert result.error_code == "unsupported_kind" and "restore is not supported" in result.error_message
    assert "restore" not in engine.supported_kinds()


def test_idempotency_key(deployed):
    server, client, accounts = deployed
    alice = accounts["alice"]
    body = {"prompt": "same", **TINY}
    h = {**alice.headers, "Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", json=body, headers=h)
    second = client.post("/v1/jobs", json=body, headers=h)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = client.post("/v1/jobs", json={**body, "prompt": "different"}, headers=h)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # the same key is per user: bob gets his own job
    bob = accounts["bob"]
    theirs = client.post("/v1/jobs", json=body, headers={**bob.headers, "Idempotency-Key": "k-1"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_idempotency_key_while_the_first_is_being_accepted(served):
    server, client, accounts = served
    from serving import new_account
    from malerei.serve.db.models import IdempotencyKey, User
    from malerei.serve.db.session import Database
    from malerei.serve.jobs.service import request_hash

    user = new_account(server, "idem")
    body = {"prompt": "in flight", **TINY}
    db = Database(f"sqlite:///{server.data_dir / 'malerei.db'}")
    with db.write() as session:  # what the first request leaves while it is still running
        user_id = session.query(User).filter_by(name=user.name).one().id
        parsed = {"kind": "txt2img", "model": None, "webhook_url": None, "prompt": "in flight",
                  "negative_prompt": "", "sampler": None, "scheduler": "Automatic", "steps": 4, "cfg_scale": None,
                  "seed": -1, "subseed": -1, "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1}
        session.add(IdempotencyKey(user_id=user_id, key="busy", request_hash=request_hash(parsed), state="pending",
                                   created_at=time.time()))
    db.dispose()
    r = client.post("/v1/jobs", json=body, headers={**user.headers, "Idempotency-Key": "busy"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_in_use"
    r = client.post("/v1/jobs", json={**body, "prompt": "other"}, headers={**user.headers, "Idempotency-Key": "busy"})
    assert r.status_code == 422


def _png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _result(client, headers, job) -> Image.Image:
    assert job.status_code == 202, job.text
    done = wait_job(client, job.json()["id"], headers)
    assert done["status"] == "succeeded", done
    return Image.open(io.BytesIO(client.get(done["images"][0]["url"], headers=headers).content)).convert("RGB")


def test_img2img_inpaint_outpaint(served):
    from serving import new_account

    server, client, _ = served
    user = new_account(server, "painter")
    h = user.headers
    source = Image.new("RGB", (64, 64), (30, 200, 90))
    source.paste((220, 20, 20), (8, 8, 56, 24))
    common = {"prompt": "a red circle", "steps": 4, "seed": 5}

    out = _result(client, h, client.post("/v1/jobs", json={"kind": "img2img", "init_image": _png_b64(source),
                                                            "denoising_strength": 0.5, **common}, headers=h))
    assert out.size == (64, 64)

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left part only
    out = _result(client, h, client.post("/v1/jobs", json={"kind": "inpaint", "init_image": _png_b64(source),
                                                            "mask_image": _png_b64(mask), "mask_blur": 2,
                                                            "denoising_strength": 1.0, **common}, headers=h))
    kept = np.asarray(out)[:, 40:]
    assert (kept == np.asarray(source)[:, 40:]).all()  # far from the mask: the input's own pixels
    assert (np.asarray(out)[:, :16] != np.asarray(source)[:, :16]).any()  # the masked part was repainted

    out = _result(client, h, client.post("/v1/jobs", json={"kind": "outpaint", "init_image": _png_b64(source),
                                                            "left": 16, "bottom": 8, **common}, headers=h))
    assert out.size == (80, 72)
    assert (np.asarray(out)[8:40, 40:72] == np.asarray(source)[8:40, 24:56]).all()

    bad_mask = _png_b64(Image.new("L", (32, 32), 255))
    r = client.post("/v1/jobs", json={"kind": "inpaint", "init_image": _png_b64(source), "mask_image": bad_mask,
                                      **common}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "mask_size_mismatch"
