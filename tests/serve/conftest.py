"""Fixtures: running servers (real HTTP, real SQLite file, real engine with the tiny models of
tests/conftest.py). Helpers live in serving.py."""

from __future__ import annotations

import httpx
import pytest

from serving import Server, make_account, model_args


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
