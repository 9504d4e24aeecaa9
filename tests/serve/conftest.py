"""Fixtures: running servers (real HTTP, real database, real engine with the tiny models of
tests/conftest.py). Helpers live in serving.py, the PostgreSQL and Redis servers in backends.py.

``served`` is the embedded deployment (SQLite file, in-process worker). ``deployed`` is
parametrised over three deployments, so a test that takes it runs on each:

    sqlite              ``served`` itself
    postgresql          PostgreSQL, the database queue, the in-process worker plus one
                        ``malerei worker`` process (two claimers: FOR UPDATE SKIP LOCKED)
    postgresql+redis    PostgreSQL, the Redis queue, an API server without a worker and two
                        ``malerei worker`` processes

Without the PostgreSQL/Redis binaries or drivers those deployments are skipped locally and fail
under CI (``CI`` set), so a CI run cannot pass without them.
"""

from __future__ import annotations

import itertools
import os

import httpx
import pytest

import backends
from serving import Server, Stack, WorkerProcess, make_account, model_args

STACKS = ("sqlite", "postgresql", "postgresql+redis")


def require(*, postgres: bool = False, redis: bool = False) -> None:
    """Skip (locally) or fail (under CI) when the wanted servers cannot run here."""
    reason = backends.missing(postgres=postgres, redis=redis)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL/Redis tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster for the session; each stack gets a database of its own."""
    require(postgres=True)
    with backends.PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_server():
    require(redis=True)
    with backends.RedisServer() as server:
        yield server


_prefixes = itertools.count()


@pytest.fixture
def make_stack(request):
    """``make_stack(name)``: a fresh :class:`Stack` (new database, new Redis key prefix)."""

    def make(name: str) -> Stack:
        if name == "sqlite":
            return Stack()
        require(postgres=True, redis="redis" in name)
        url = request.getfixturevalue("pg_cluster").create_database()
        if name == "postgresql":
            return Stack(name=name, database_url=url)
        if name == "postgresql+redis":
            return Stack(name=name, database_url=url, queue=request.getfixturevalue("redis_server").url,
                         redis_prefix=f"t{next(_prefixes)}:")
        raise ValueError(f"unknown stack {name!r}; known: {', '.join(STACKS)}")

    return make


@pytest.fixture(scope="session")
def serve_models_dir(tmp_path_factory, tiny_models_dir):
    """The tiny models folder plus a tiny x4 upscaler (ESRGAN/) and restorer (Restorers/) in
    real spandrel layouts (tests/image_nets.py)."""
    import shutil

    import image_nets

    root = tmp_path_factory.mktemp("serve-models") / "models"
    shutil.copytree(tiny_models_dir, root)
    (root / "ESRGAN").mkdir()
    image_nets.save(image_nets.compact_state(4), root / "ESRGAN" / "4x-Tiny.safetensors")
    (root / "Restorers").mkdir()
    image_nets.save(image_nets.compact_state(1), root / "Restorers" / "tiny-restore.safetensors")
    return root


@pytest.fixture(scope="session")
def served(tmp_path_factory, serve_models_dir):
    """A running server (in-process worker, real engine, tiny model) with users alice, bob and
    root (admin)."""
    data_dir = tmp_path_factory.mktemp("serve")
    accounts = {name: make_account(data_dir, name, admin=name == "root") for name in ("alice", "bob", "root")}
    server = Server(data_dir=data_dir, args=[*model_args(serve_models_dir), "--set", "webhook_allow_private=true",
                                             "--set", "webhook_backoff_s=0.2",
                                             "--set", "rate_limit_per_minute=6000"]).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield server, client, accounts
    finally:
        server.stop()



@pytest.fixture(scope="session", params=STACKS)
def deployed(request, tmp_path_factory, serve_models_dir):
    """``served`` on each stack: (server, client, accounts alice, bob and root)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("served")
        return
    require(postgres=True, redis="redis" in request.param)
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    if request.param == "postgresql":
        stack, serve_args, n_workers = Stack(name=request.param, database_url=url), [], 1
    else:
        stack = Stack(name=request.param, database_url=url, queue=request.getfixturevalue("redis_server").url,
                      redis_prefix=f"d{next(_prefixes)}:")
        serve_args, n_workers = ["--no-worker"], 2
    data_dir = tmp_path_factory.mktemp(f"serve-{request.param.replace('+', '-')}")
    accounts = {name: make_account(data_dir, name, admin=name == "root", stack=stack)
                for name in ("alice", "bob", "root")}
    settings = ["--set", "webhook_allow_private=true", "--set", "webhook_backoff_s=0.2"]
    server = Server(data_dir=data_dir, stack=stack,
                    args=[*model_args(serve_models_dir), *settings, "--set", "rate_limit_per_minute=6000",
                          *serve_args]).start()
    workers = [WorkerProcess(data_dir, serve_models_dir, n, stack=stack, args=settings) for n in range(n_workers)]
    try:
        for worker in workers:
            worker.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield server, client, accounts
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop()
        server.stop()


@pytest.fixture(scope="session")
def api_only(tmp_path_factory, tiny_models_dir):
    """A server without a worker (jobs stay queued) and with small limits, for limit tests."""
    data_dir = tmp_path_factory.mktemp("api")
    server = Server(data_dir=data_dir, args=[*model_args(tiny_models_dir), "--no-worker",
                                             "--set", "rate_limit_per_minute=60", "--set", "rate_limit_burst=5",
                                             "--set", "max_queued_per_user=3"]).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield server, client
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fuzz_target(tmp_path_factory, tiny_models_dir):
    """A server (with worker) whose limits keep every acceptable job tiny, for schemathesis."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    account = make_account(data_dir, "fuzzer", credits=500)
    server = Server(data_dir=data_dir, args=[*model_args(tiny_models_dir), "--set", "max_pixels=4096",
                                             "--set", "max_steps=2", "--set", "max_batch=2",
                                             "--set", "rate_limit_per_minute=0", "--set", "sync_timeout_s=120",
                                             "--set", "max_input_pixels=65536"]).start()
    try:
        yield server, account
    finally:
        server.stop()
