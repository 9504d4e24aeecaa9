"""Every route that takes an id, called as the owner, as another user, anonymously and with a
revoked key: only the owner sees anything; others get 404 (users) or 401 (no valid key)."""

from __future__ import annotations

import time

from serving import new_account, wait_job

SECRET_PROMPT = "a secret green circle"


def _table(job_id: str, image_id: str, key_id: str, signed: str) -> list[tuple[str, str, int]]:
    """(method, path, status for the owner); the owner's destructive calls come last."""
    return [
        ("GET", f"/v1/jobs/{job_id}", 200),
        ("GET", f"/v1/jobs/{job_id}/events", 200),
        ("GET", f"/v1/images/{image_id}", 200),
        ("GET", f"/v1/images/{image_id}/file", 200),
        ("GET", signed, 200),
        ("DELETE", f"/v1/jobs/{job_id}", 200),
        ("DELETE", f"/v1/account/keys/{key_id}", 204),
        ("DELETE", f"/v1/images/{image_id}", 204),
    ]


# Id-taking routes covered elsewhere: admin routes (role checks below), Stability engine ids
# (models, not user resources).
NOT_USER_RESOURCES = {"/v1/admin/users/{name}/credits", "/v1/admin/users/{name}/keys", "/v1/admin/keys/{key_id}",
                      "/v1/generation/{engine_id}/text-to-image", "/v1/generation/{engine_id}/image-to-image",
                      "/v1/generation/{engine_id}/image-to-image/masking"}


def test_no_leak_across_users(deployed):
    server, client, _ = deployed
    owner, other, revoked = new_account(server, "own"), new_account(server, "oth"), new_account(server, "rev")
    assert client.delete(f"/v1/account/keys/{revoked.key_id}", headers=revoked.headers).status_code == 204

    job = client.post("/v1/jobs", json={"prompt": SECRET_PROMPT, "width": 64, "height": 64, "steps": 2},
                      headers=owner.headers).json()
    done = wait_job(client, job["id"], owner.headers)
    image_id = done["images"][0]["id"]
    spare_key = client.post("/v1/account/keys", json={"name": "spare"}, headers=owner.headers).json()
    edit = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "response_format": "url"},
                       headers=owner.headers).json()
    signed = edit["data"][0]["url"].split(str(client.base_url).rstrip("/"))[-1]
    signed_image = signed.split("/v1/files/")[1].split("?")[0]

    table = _table(job["id"], image_id, spare_key["id"], signed)
    covered = {path for _, path, _ in table}
    templates = [p for p in client.get("/openapi.json").json()["paths"] if "{" in p]
    for template in templates:
        if template in NOT_USER_RESOURCES:
            continue
        prefix = template.split("{")[0]
        assert any(path.startswith(prefix) for path in covered), f"id route {template} is not in the leak test"

    callers = {"other": other.headers, "anonymous": {}, "revoked": revoked.headers}
    for method, path, _ in table:
        for who, headers in callers.items():
            if path == signed:
                continue
            r = client.request(method, path, headers=headers)
            expected = 404 if who == "other" else 401
            assert r.status_code == expected, (who, method, path, r.status_code, r.text)
            assert SECRET_PROMPT not in r.text
            if who == "other":
                assert r.json() == {"error": {"code": "not_found", "message": r.json()["error"]["message"]}}
    # signed URLs: a wrong signature, another image id or an expired one answer 404 to anyone
    assert client.get(signed.replace("signature=", "signature=0")).status_code == 404
    assert client.get(signed.replace(signed_image, image_id)).status_code == 404
    expired = signed.split("expires=")[0] + f"expires={int(time.time()) - 10}&" + signed.split("&", 1)[1]
    assert client.get(expired).status_code == 404
    # another user's job cannot be cancelled, and an unknown id looks the same as a foreign one
    unknown = client.get("/v1/jobs/job_doesnotexist", headers=other.headers)
    foreign = client.get(f"/v1/jobs/{job['id']}", headers=other.headers)
    assert unknown.json() == foreign.json()

    for method, path, status in table:
        r = client.request(method, path, headers=owner.headers)
        assert r.status_code == status, (method, path, r.text)


def test_admin_routes_need_the_admin_role(served):
    server, client, _ = served
    user, admin = new_account(server, "plain"), new_account(server, "boss", admin=True)
    calls = [("GET", "/v1/admin/users", None), ("POST", "/v1/admin/users", {"name": "mallory"}),
             ("POST", f"/v1/admin/users/{user.name}/credits", {"amount": 5}),
             ("POST", f"/v1/admin/users/{user.name}/keys", {}),
             ("DELETE", f"/v1/admin/keys/{user.key_id}", None)]
    for method, path, body in calls:
        assert client.request(method, path, json=body, headers=user.headers).status_code == 403
        assert client.request(method, path, json=body).status_code == 401
    r = client.post(f"/v1/admin/users/{user.name}/credits", json={"amount": 5}, headers=admin.headers)
    assert r.status_code == 200 and r.json()["balance"] == 1005
    assert client.delete(f"/v1/admin/keys/{user.key_id}", headers=admin.headers).status_code == 204
    assert client.get("/v1/account", headers=user.headers).status_code == 401


def test_signed_url_with_any_text_is_a_plain_404(served):
    # Found by schemathesis: a non-ASCII signature made hmac.compare_digest raise (500).
    _, client, _ = served
    for signature in ("ÒK\u00e9\u4e2d", "0" * 64, ""):
        answer = client.get("/v1/files/%C3%92K%F0%AA%AE%BE", params={"expires": 2**39, "signature": signature})
        assert answer.status_code == 404, (signature, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
