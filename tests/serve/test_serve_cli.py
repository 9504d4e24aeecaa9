"""Admin CLI and `serve` start-up rules, run as processes on a real data dir."""

from __future__ import annotations

import httpx
import pytest

from serving import Server, free_port, run_cli, server_env


@pytest.mark.parametrize("stack_name", ["sqlite", "postgresql+redis"])
def test_users_keys_credits_and_revoke(stack_name, make_stack, tmp_path, tiny_models_dir):
    stack = make_stack(stack_name)
    db_args = ["--database-url", stack.database_url] if stack.database_url else []
    added = run_cli("users", "add", "carol", "--admin", "--password-stdin", *db_args, data_dir=tmp_path,
                    stdin="carol-secret-pw\n")
    assert added.returncode == 0, added.stderr
    again = run_cli("users", "add", "carol", *db_args, data_dir=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    # $MALEREI_DATABASE_URL does what --database-url does
    env = server_env(**({"MALEREI_DATABASE_URL": stack.database_url} if stack.database_url else {}))
    created = run_cli("keys", "create", "carol", data_dir=tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    assert key.startswith("mk_")
    key_id = key.split("_")[1]
    assert "carol" in created.stdout and key_id in created.stdout

    credited = run_cli("credits", "add", "carol", "250", *db_args, data_dir=tmp_path)
    assert credited.returncode == 0 and "250" in credited.stdout
    assert run_cli("credits", "add", "nobody", "5", *db_args, data_dir=tmp_path).returncode == 2

    # the key is stored hashed: the secret part is nowhere in the database
    secret = key.split("_", 2)[2]
    if stack.database_url is None:
        assert secret.encode() not in (tmp_path / "malerei.db").read_bytes()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(stack.database_url)
        with engine.connect() as conn:
            dump = repr([conn.execute(text(f"SELECT * FROM {t}")).all() for t in ("users", "api_keys")])
        engine.dispose()
        assert "carol" in dump and secret not in dump

    server = Server(data_dir=tmp_path, stack=stack,
                    args=["--no-worker", "--models-dir", str(tiny_models_dir)]).start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        me = httpx.get(server.url + "/v1/account", headers=headers).json()
        assert me == {"name": "carol", "is_admin": True, "balance": 250}
        login = httpx.post(server.url + "/v1/auth/login", json={"username": "carol", "password": "carol-secret-pw"})
        assert login.status_code == 200 and "malerei_session" in login.cookies
        assert httpx.get(server.url + "/v1/account", cookies=login.cookies).json()["name"] == "carol"
        bad = httpx.post(server.url + "/v1/auth/login", json={"username": "carol", "password": "wrong-password"})
        assert bad.status_code == 401

        revoked = run_cli("keys", "revoke", key_id, *db_args, data_dir=tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        gone = httpx.get(server.url + "/v1/account", headers=headers)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "unauthorized"
        assert run_cli("keys", "revoke", "nonexistent", *db_args, data_dir=tmp_path).returncode == 2
    finally:
        server.stop()
    assert key not in server.log() and secret not in server.log()  # logs carry no secrets


def test_public_address_requires_authentication(tmp_path):
    refused = run_cli("serve", "--host", "0.0.0.0", "--no-auth", data_dir=tmp_path)
    assert refused.returncode == 2
    assert "refusing to bind" in refused.stderr and "authentication" in refused.stderr


def test_a_queue_that_cannot_work_is_refused(tmp_path):
    unknown = run_cli("serve", "--queue", "amqp://localhost", data_dir=tmp_path)
    assert unknown.returncode == 2 and "'sql'" in unknown.stderr and "redis://" in unknown.stderr
    nowhere = run_cli("worker", "--queue", f"redis://:hunter2@127.0.0.1:{free_port()}/0", data_dir=tmp_path)
    assert nowhere.returncode == 2 and "cannot reach the Redis queue" in nowhere.stderr
    assert "hunter2" not in nowhere.stderr


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
