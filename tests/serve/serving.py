"""Helpers for the service tests: a real ``malerei serve`` over HTTP on a real database.

The server runs as a subprocess (``python -m malerei serve`` semantics, through the serve command
module), so the tests see exactly what clients see: HTTP, the worker, the database on disk.
A :class:`Stack` says which database and queue a server and its workers use: the embedded
SQLite file (the default), PostgreSQL, or PostgreSQL with the Redis queue (servers made by
backends.py). The web page tests (tests/web/webtools.py) start their servers with
:class:`Server` too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


def malerei_argv(*args: str) -> list[str]:
    """The installed command line itself: ``python -m malerei ...``."""
    return [sys.executable, "-m", "malerei", *map(str, args)]


@dataclass(frozen=True)
class Stack:
    """Where a deployment keeps its jobs: ``name`` is "sqlite", "postgresql" or "postgresql+redis"."""

    name: str = "sqlite"
    database_url: str | None = None   # None: the SQLite file in the data dir
    queue: str | None = None          # None: the database queue; else a Redis URL
    redis_prefix: str | None = None   # several stacks share one test Redis

    @property
    def args(self) -> list[str]:
        """The CLI options of ``serve`` and ``worker`` for this stack."""
        out = []
        if self.database_url:
            out += ["--database-url", self.database_url]
        if self.queue:
            out += ["--queue", self.queue]
        if self.redis_prefix:
            out += ["--set", f"redis_prefix={self.redis_prefix}"]
        return out

    def db_url(self, data_dir: Path) -> str:
        return self.database_url or f"sqlite:///{data_dir / 'malerei.db'}"


@dataclass
class Server:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=server_env)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    stack: Stack = field(default_factory=Stack)
    launcher: Callable[..., list[str]] = cli_argv  # or malerei_argv: the real CLI with every command

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.port}.log"

    @property
    def db_url(self) -> str:
        return self.stack.db_url(self.data_dir)

    def start(self, timeout: float = 60.0) -> Server:
        """Start the process and wait until /healthz answers 200."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.launcher("serve", "--port", str(self.port), "--data-dir",
                                                       str(self.data_dir), *self.stack.args, *self.args),
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
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
        self.stop()
        raise RuntimeError(f"server did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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


def make_account(data_dir: Path, name: str, *, credits: int = 1000, admin: bool = False,
                 stack: Stack = Stack()) -> Account:
    """A user with an API key and credits, made through the library on the server's database."""
    from malerei.serve import credits as ledger
    from malerei.serve.accounts.keys import create_key
    from malerei.serve.accounts.users import create_user
    from malerei.serve.db.migrate import upgrade
    from malerei.serve.db.session import Database

    db = Database(stack.db_url(data_dir))
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
    return make_account(server.data_dir, f"{prefix}{next(_counter)}", credits=credits, admin=admin,
                        stack=server.stack)


class WorkerProcess:
    """A ``malerei worker`` process on a data dir and stack; its log says " ready" once warm."""

    def __init__(self, data_dir: Path, models_dir: Path, n: int, *, stack: Stack = Stack(),
                 args: Sequence[str] = ()) -> None:
        self.log = data_dir / f"worker-{n}.log"
        with open(self.log, "wb") as handle:
            self.proc = subprocess.Popen(cli_argv("worker", "--data-dir", str(data_dir), *model_args(models_dir),
                                                  *stack.args, *args),
                                         cwd=REPO, env=server_env(), stdout=handle, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready" in self.log.read_text(errors="replace"):
                return self
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting: stop several at once, then ``stop()`` each."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
