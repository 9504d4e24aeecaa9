"""Bounds, uploads and bad input: 4xx with one stable error shape, never a crash."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

from PIL import Image

from serving import new_account


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (a few tens of KB; 400 MB once decoded to 8 bits)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def png(size=(32, 32), color="red", fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(r, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


def test_decompression_bomb_is_refused_fast(served):
    server, client, _ = served
    user = new_account(server, "bomber")
    bomb = png_bomb()
    assert len(bomb) < 200_000
    started = time.perf_counter()
    r = client.post("/v1/jobs", json={"kind": "img2img", "prompt": "x", "init_image": b64(bomb)}, headers=user.headers)
    assert time.perf_counter() - started < 1.0
    assert_error(r, 413, "image_too_large")
    started = time.perf_counter()
    r = client.post("/v1/images/edits", files={"image": ("cat.png", bomb, "image/png")}, data={"prompt": "x"},
                    headers=user.headers)
    assert time.perf_counter() - started < 1.0
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = client.post("/sdapi/v1/png-info", json={"image": b64(bomb)}, headers=user.headers)
    assert r.status_code == 413
    assert client.get("/v1/account", headers=user.headers).json()["balance"] == 1000


def test_corrupt_and_foreign_formats(served):
    server, client, _ = served
    user = new_account(server, "corrupt")
    good = png()
    cases = {
        "truncated png": (good[: len(good) // 2], 400, "invalid_image"),
        "png header then junk": (good[:16] + b"\x00" * 200, 400, "invalid_image"),
        "gif": (png(fmt="GIF"), 415, "unsupported_image_format"),
        "bmp named .png": (png(fmt="BMP"), 415, "unsupported_image_format"),
        "text": (b"hello, not an image", 415, "unsupported_image_format"),
    }
    for name, (data, status, code) in cases.items():
        r = client.post("/v1/jobs", json={"kind": "img2img", "prompt": "x", "init_image": b64(data)},
                        headers=user.headers)
        assert_error(r, status, code)
    r = client.post("/v1/jobs", json={"kind": "img2img", "prompt": "x", "init_image": "%%%not base64%%%"},
                    headers=user.headers)
    assert_error(r, 400, "invalid_base64")
    # a JPEG and a WebP named .png are decoded by their content
    for fmt in ("JPEG", "WEBP"):
        r = client.post("/v1/jobs", json={"kind": "img2img", "prompt": "x", "init_image": b64(png(fmt=fmt))},
                        headers=user.headers)
        assert r.status_code == 202, r.text


def test_upload_size_limit(served):
    server, client, _ = served
    user = new_account(server, "big")
    huge = b"\x89PNG\r\n\x1a\n" + b"\x00" * (26 * 1024 * 1024)
    r = client.post("/v1/images/edits", files={"image": ("x.png", huge, "image/png")}, data={"prompt": "x"},
                    headers=user.headers)
    assert r.status_code == 413
    r = client.post("/v1/jobs", json={"kind": "img2img", "prompt": "x", "init_image": b64(huge)}, headers=user.headers)
    assert_error(r, 413)


def test_parameter_bounds(served):
    server, client, _ = served
    user = new_account(server, "bounds")
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    for change, code in [({"width": 4096, "height": 4096}, "size_out_of_range"), ({"steps": 1000}, "steps_out_of_range"),
                         ({"batch_size": 64}, "batch_out_of_range"), ({"sampler": "Nope"}, "unknown_sampler"),
                         ({"scheduler": "Nope"}, "unknown_scheduler"), ({"model": "no-such-model"}, "model_not_found"),
                         ({"width": 65}, "invalid_request"), ({"kind": "paint"}, "invalid_request"),
                         ({"seed": -5}, "invalid_request"), ({"webhook_url": "ftp://x"}, "invalid_request")]:
        r = client.post("/v1/jobs", json={**base, **change}, headers=user.headers)
        assert_error(r, 422, code)
    assert_error(client.post("/v1/jobs", content=b"{not json", headers={**user.headers,
                                                                       "content-type": "application/json"}), 422)
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/v1/jobs", headers=user.headers), 405)
    assert client.get("/v1/account", headers=user.headers).json()["balance"] == 1000


def test_rate_limit_and_queue_cap(api_only):
    server, client = api_only
    user = new_account(server, "limited")
    codes = []
    for i in range(8):
        r = client.post("/v1/jobs", json={"prompt": f"x{i}", "width": 64, "height": 64, "steps": 2},
                        headers=user.headers)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
    # 3 queued (the cap), then the cap answers 429 until the burst of 5 is spent, then the rate limit
    assert codes[:3] == [202, 202, 202], codes
    assert all(c == 429 for c in codes[3:]), codes
    assert client.get("/v1/jobs", headers=user.headers).status_code == 429  # still limited
    other = new_account(server, "unlimited")  # limits are per key
    assert client.get("/v1/account", headers=other.headers).status_code == 200


def test_health_metrics_docs(deployed):
    server, client, _ = deployed
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["database"] == "ok" and health["queue"] == "ok"
    metrics = client.get("/metrics").text
    for name in ("malerei_queue_depth", "malerei_job_latency_seconds_bucket", "malerei_images_per_second",
                 "malerei_images_generated_total"):
        assert name in metrics
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/sdapi/v1/txt2img" in spec["paths"]
