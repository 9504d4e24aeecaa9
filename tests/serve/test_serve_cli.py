"""Admin CLI and `serve` start-up rules, run as processes on a real data dir."""

from __future__ import annotations

import httpx

from serving import Server, run_cli


def test_users_keys_credits_and_revoke(tmp_path, tiny_models_dir):
    added = run_cli("users", "add", "carol", "--admin", "--password-stdin", data_dir=tmp_path,
                    stdin="carol-secret-pw\n")
    assert added.returncode == 0, added.stderr
    again = run_cli("users", "add", "carol", data_dir=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    created = run_cli("keys", "create", "carol", data_dir=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    assert key.startswith("mk_")
    key_id = key.split("_")[1]
    assert "carol" in created.stdout and key_id in created.stdout

    credited = run_cli("credits", "add", "carol", "250", data_dir=tmp_path)
    assert credited.returncode == 0 and "250" in credited.stdout
    assert run_cli("credits", "add", "nobody", "5", data_dir=tmp_path).returncode == 2

    # the key is stored hashed: the secret part is nowhere in the database file
    secret = key.split("_", 2)[2]
    assert secret.encode() not in (tmp_path / "malerei.db").read_bytes()

    server = Server(data_dir=tmp_path, args=["--no-worker", "--models-dir", str(tiny_models_dir)]).start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        me = httpx.get(server.url + "/v1/account", headers=headers).json()
        assert me == {"name": "carol", "is_admin": True, "balance": 250}
        login = httpx.post(server.url + "/v1/auth/login", json={"username": "carol", "password": "carol-secret-pw"})
        assert login.status_code == 200 and "malerei_session" in login.cookies
        assert httpx.get(server.url + "/v1/account", cookies=login.cookies).json()["name"] == "carol"
        bad = httpx.post(server.url + "/v1/auth/login", json={"username": "carol", "password": "wrong-password"})
        assert bad.status_code == 401

        revoked = run_cli("keys", "revoke", key_id, data_dir=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        gone = httpx.get(server.url + "/v1/account", headers=headers)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "unauthorized"
        assert run_cli("keys", "revoke", "nonexistent", data_dir=tmp_path).returncode == 2
    finally:
        server.stop()
    assert key not in server.log() and secret not in server.log()  # logs carry no secrets


def test_public_address_requires_authentication(tmp_path):
    refused = run_cli("serve", "--host", "0.0.0.0", "--no-auth", data_dir=tmp_path)
    assert refused.returncode == 2
    assert "refusing to bind" in refused.stderr and "authentication" in refused.stderr


def test_unknown_setting_is_refused(tmp_path):
    result = run_cli("serve", "--set", "no_such_thing=1", data_dir=tmp_path)
    assert result.returncode == 2 and "no_such_thing" in result.stderr


def test_malerei_cli_lists_the_service_commands():
    import subprocess
    import sys

    from serving import REPO, server_env

    out = subprocess.run([sys.executable, "-m", "malerei", "--help"], capture_output=True, text=True, cwd=REPO,
                         env=server_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("serve", "worker", "users", "keys", "credits"):
        assert command in out.stdout
