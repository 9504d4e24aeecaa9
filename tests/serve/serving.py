"""Helpers for the service tests: a real ``malerei serve`` over HTTP on a real SQLite file.

The server runs as a subprocess (``python -m malerei serve`` semantics, through the serve command
module), so the tests see exactly what clients see: HTTP, the worker, the database on disk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Runs the serve command module's parsers (serve, worker, users, keys, credits) as malerei.cli does
# (``error: <message>`` and exit 2 on a MalereiError), independent of the other commands' modules.
LAUNCH = """
import argparse, sys
from malerei.commands import serve as m
from malerei.engine.errors import MalereiError
p = argparse.ArgumentParser(prog="malerei")
m.register(p.add_subparsers(required=True))
a = p.parse_args(sys.argv[1:])
try:
    sys.exit(a.func(a))
except MalereiError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, *map(str, args)]


def run_cli(*args: str, data_dir: Path, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args, "--data-dir", str(data_dir)), input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=env or server_env(), timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


@dataclass
class Server:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=server_env)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        log = open(self.data_dir / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(cli_argv("serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                                              *self.args), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.data_dir.glob(f"server-{self.port}.log"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Account:
    name: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_account(data_dir: Path, name: str, *, credits: int = 1000, admin: bool = False) -> Account:
    """A user with an API key and credits, made through the library on the server's database file."""
    from malerei.serve import credits as ledger
    from malerei.serve.accounts.keys import create_key
    from malerei.serve.accounts.users import create_user
    from malerei.serve.db.migrate import upgrade
    from malerei.serve.db.session import Database

    db = Database(f"sqlite:///{data_dir / 'malerei.db'}")
    upgrade(db)
    with db.write() as session:
        user = create_user(session, name, password=f"{name}-password", is_admin=admin)
        row, key = create_key(session, user)
        if credits:
            ledger.grant(session, user, credits)
    db.dispose()
    return Account(name=name, key=key, key_id=row.id)


def wait_job(client: httpx.Client, job_id: str, headers: dict, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


TINY_MODEL = "tiny-sd1"


def model_args(models_dir: Path) -> list[str]:
    """Serve the tiny real models (tests/conftest.py) with the tiny SD1 folder as the default."""
    return ["--models-dir", str(models_dir), "--default-model", TINY_MODEL]


_counter = iter(range(10**6))


def new_account(server: Server, prefix: str, *, credits: int = 1000, admin: bool = False) -> Account:
    """A fresh user on a running server's database (so tests sharing a server stay independent)."""
    return make_account(server.data_dir, f"{prefix}{next(_counter)}", credits=credits, admin=admin)
