"""Throwaway PostgreSQL and Redis servers for the service tests (real binaries, temp dirs).

``PostgresCluster``: ``initdb`` into a fresh temp dir, ``pg_ctl start`` on a free port of
127.0.0.1 (trust authentication, nothing written durably: fsync off). PostgreSQL refuses to
run as root, so under root the cluster belongs to the ``postgres`` user (made by Debian's
postgresql-common), else ``nobody``, and its commands run through ``runuser``.
``RedisServer``: ``redis-server`` on a free port, no persistence.

Binaries come from PATH or Debian's ``/usr/lib/postgresql/<version>/bin``; ``bash
.ci/setup-services`` installs them. :func:`missing` says what is absent, and the fixtures in
conftest.py skip with that reason locally but fail under CI (``CI`` set), as the web tests do.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from serving import free_port

SETUP_HINT = "install them with `bash .ci/setup-services` (Debian: apt-get install postgresql redis-server)"


def postgres_bindir() -> Path | None:
    """The folder with initdb/pg_ctl/postgres: PATH first, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def missing(*, postgres: bool = False, redis: bool = False) -> str | None:
    """Why the wanted servers cannot run here (binaries or Python drivers absent), or None."""
    problems = []
    if postgres:
        if postgres_bindir() is None:
            problems.append("PostgreSQL binaries (initdb, pg_ctl) not found")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            problems.append("Python package psycopg not installed (pip install -e '.[serve]')")
    if redis:
        if shutil.which("redis-server") is None:
            problems.append("redis-server not found")
        try:
            import redis  # noqa: F401
        except ImportError:
            problems.append("Python package redis not installed (pip install -e '.[serve]')")
    if not problems:
        return None
    return "; ".join(problems) + f": {SETUP_HINT}"


def _cluster_user() -> str | None:
    """The OS user that owns the cluster: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to own the cluster")


def _shared_tmp() -> str:
    """A temp dir other users can reach: $TMPDIR when every folder above it is searchable, else /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    if all(p.stat().st_mode & 0o001 for p in (base, *base.parents)):
        return str(base)
    return "/tmp"


class PostgresCluster:
    """``with PostgresCluster() as pg: url = pg.create_database("x")``."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise RuntimeError(f"PostgreSQL binaries not found: {SETUP_HINT}")
        self.user = _cluster_user()
        # not under pytest's tmp dir: that is private to root (0700) and the cluster user must reach it
        self.root = Path(tempfile.mkdtemp(prefix="malerei-pg-", dir=_shared_tmp() if self.user else None))
        self.data = self.root / "data"
        self.port = free_port()
        self._count = 0

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        return done

    def start(self) -> PostgresCluster:
        if self.user is not None:
            shutil.chown(self.root, user=self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        # TCP on 127.0.0.1 only, no Unix socket (its path length is limited)
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                   "-c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "malerei") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"{prefix}_{self._count}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A ``redis-server`` on a free port of 127.0.0.1, no persistence, deleted on stop."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="malerei-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisServer:
        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.root),
                                      "--logfile", str(self.root / "redis.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
