"""The web page driven in Debian's Chromium (headless) through Playwright, against a real
``python -m malerei serve`` process (tiny SD1 model from tests/conftest.py, temp data dir).

Needs ``bash .ci/setup-web`` (Debian chromium + Python playwright; never ``playwright install``).
Without them the tests are skipped locally and fail under CI (``CI`` set), so CI cannot pass
without running them.

A failing test leaves a screenshot in ``tests/web/artifacts/`` (or ``$MALEREI_WEB_ARTIFACTS``).
Every page is watched for console errors and uncaught exceptions: a test that expects an HTTP
error status says so with ``tab.allow_http_error(status)``; anything else fails the test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from webtools import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, DESKTOP, HERE, MODEL, Tab, WebServer, _screenshot


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found: run `bash .ci/setup-web`"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Python playwright is not installed: run `bash .ci/setup-web`"
    return None


def pytest_collection_modifyitems(config, items):
    """Without Chromium or Playwright: skip the web tests locally; under CI let them fail (in the
    ``browser`` fixture, with the reason) so a CI run cannot pass without them."""
    reason = _missing()
    if reason is None or os.environ.get("CI"):
        return
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


# Settings of the test servers: previews at most every 0.2 s; uploads are capped
# low so a real 413 is cheap to cause; the rate limit stays out of the way of a fast browser.
SERVER_SETTINGS = ["--set", "preview_every_s=0.2", "--set", "max_upload_bytes=60000",
                   "--set", "rate_limit_per_minute=60000", "--set", "rate_limit_burst=5000"]


@pytest.fixture(scope="session")
def web_models_dir(tiny_sd1, tmp_path_factory) -> Path:
    """The tiny SD1 folder, a tiny x4 upscaler (ESRGAN/) and restorer (Restorers/) in real
    spandrel layouts (tests/image_nets.py), and an "upscaler" that is no model at all."""
    import image_nets

    root = tmp_path_factory.mktemp("web-models")
    shutil.copytree(tiny_sd1.folder, root / MODEL)
    (root / "ESRGAN").mkdir()
    image_nets.save(image_nets.compact_state(4), root / "ESRGAN" / "4x-Tiny.safetensors")
    (root / "ESRGAN" / "broken.safetensors").write_bytes(b"not a model")  # fails in the worker
    (root / "Restorers").mkdir()
    image_nets.save(image_nets.compact_state(1), root / "Restorers" / "tiny-restore.safetensors")
    return root


@pytest.fixture(scope="session")
def server(web_models_dir, tmp_path_factory):
    """A running server shared by the tests, with an admin ``root`` (password ``root-password``)."""
    data_dir = tmp_path_factory.mktemp("web-serve")
    srv = WebServer(data_dir=data_dir, models_dir=web_models_dir, args=SERVER_SETTINGS)
    from malerei.serve.db.migrate import upgrade
    from malerei.serve.db.session import Database

    db = Database(f"sqlite:///{data_dir / 'malerei.db'}")
    upgrade(db)
    db.dispose()
    srv.add_user("root", "root-password", credits=100000, admin=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fresh_server(web_models_dir, tmp_path):
    """A just-installed server: an empty data dir, no accounts."""
    srv = WebServer(data_dir=tmp_path, models_dir=web_models_dir, args=SERVER_SETTINGS).start()
    try:
        yield srv
    finally:
        srv.stop()


_names = iter(range(10**6))


@pytest.fixture
def user(server):
    """A fresh user with 1000 credits on the shared server: (name, password)."""
    name = f"user{next(_names)}"
    server.add_user(name, f"{name}-password", credits=1000)
    return name, f"{name}-password"


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="session")
def browser():
    reason = _missing()
    if reason is not None:
        pytest.fail(f"web tests cannot run: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data-dir) of its own
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def new_tab(browser, request):
    """``new_tab(viewport=DESKTOP)``: pages in fresh contexts (own cookies), checked on teardown."""
    tabs: list[Tab] = []
    for old in ARTIFACTS.glob(f"FAILED-{request.node.name}-*.png"):
        old.unlink()  # a picture of an earlier failure of this test would mislead

    def make(viewport: dict | None = None) -> Tab:
        context = browser.new_context(viewport=viewport or DESKTOP, accept_downloads=True)
        context.set_default_timeout(15000)
        tab = Tab(context, context.new_page())
        tabs.append(tab)
        return tab

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    problems = []
    for i, tab in enumerate(tabs):
        if failed:
            try:
                path = _screenshot(tab.page, f"FAILED-{request.node.name}-{i}")
                print(f"screenshot of the failing page: {path}")
            except Exception as exc:  # noqa: BLE001 - the test already failed; report why no picture
                print(f"no screenshot: {exc}")
        problems += tab.unexpected_errors()
        tab.context.close()
    if problems and not failed:
        pytest.fail("errors in the browser console:\n" + "\n".join(problems))


@pytest.fixture
def tab(new_tab) -> Tab:
    return new_tab()
