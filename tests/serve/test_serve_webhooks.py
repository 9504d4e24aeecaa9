"""Webhooks: HMAC-signed POST on completion, retried with backoff until it is accepted."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from serving import new_account, wait_job
from malerei.serve.jobs.webhooks import HEADER, verify


def test_webhook_is_signed_and_retried(deployed):
    server, client, _ = deployed
    user = new_account(server, "hook")
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((body, self.headers[HEADER]))
            self.send_response(500 if len(received) == 1 else 204)  # the first try fails
            self.end_headers()

        def log_message(self, *args):  # quiet
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        job = client.post("/v1/jobs", json={"prompt": "a red circle", "width": 64, "height": 64, "steps": 2,
                                            "webhook_url": url}, headers=user.headers).json()
        wait_job(client, job["id"], user.headers)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = client.get(f"/v1/jobs/{job['id']}", headers=user.headers).json()["webhook"]
            if state["status"] == "delivered":
                break
            time.sleep(0.1)
        assert state == {"url": url, "status": "delivered", "attempts": 2}
    finally:
        httpd.shutdown()
    secret = client.get("/v1/account/webhook-secret", headers=user.headers).json()["secret"]
    body, signature = received[-1]
    assert verify(secret, body, signature)
    assert not verify(secret, body + b" ", signature)
    assert not verify("another-secret", body, signature)
    payload = json.loads(body)
    assert payload["type"] == "job.finished" and payload["job"]["id"] == job["id"]
    assert payload["job"]["status"] == "succeeded" and len(payload["job"]["images"]) == 1
