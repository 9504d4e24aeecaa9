"""Credits: parallel submissions never overdraw; failures and cancellations are refunded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from serving import new_account, wait_job


def test_fifty_parallel_submissions_with_credit_for_ten(deployed):
    server, client, _ = deployed
    probe = new_account(server, "probe")
    cost = client.post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64, "steps": 2},
                       headers=probe.headers).json()["cost"]
    user = new_account(server, "racer", credits=10 * cost)

    def submit(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/v1/jobs", json={"prompt": f"circle {i}", "width": 64, "height": 64, "steps": 2},
                          headers=user.headers).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(submit, range(50)))
    assert codes.count(202) == 10, codes
    assert codes.count(402) == 40, codes
    assert client.get("/v1/account", headers=user.headers).json()["balance"] == 0
    short = client.post("/v1/jobs", json={"prompt": "one more", "width": 64, "height": 64, "steps": 2},
                        headers=user.headers)
    assert short.status_code == 402 and short.json()["error"]["code"] == "insufficient_credits"
    jobs = client.get("/v1/jobs", params={"limit": 100}, headers=user.headers).json()["jobs"]
    assert len(jobs) == 10
    for job in jobs:
        assert wait_job(client, job["id"], user.headers)["status"] == "succeeded"
    ledger = client.get("/v1/account/credits", headers=user.headers).json()
    assert ledger["balance"] == 0 and sum(e["delta"] for e in ledger["entries"]) == 0
    assert [e["reason"] for e in ledger["entries"]].count("charge") == 10


def test_cost_grows_with_pixels_and_steps(served):
    server, client, _ = served
    user = new_account(server, "coster", credits=10**6)
    small = client.post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64, "steps": 2},
                        headers=user.headers).json()["cost"]
    big = client.post("/v1/jobs", json={"prompt": "a", "width": 512, "height": 512, "steps": 40, "batch_size": 2},
                      headers=user.headers).json()
    assert big["cost"] > small
    client.delete(f"/v1/jobs/{big['id']}", headers=user.headers)
    assert wait_job(client, big["id"], user.headers)["status"] == "cancelled"
    balance = client.get("/v1/account", headers=user.headers).json()["balance"]
    assert balance == 10**6 - small  # the cancelled job came back
