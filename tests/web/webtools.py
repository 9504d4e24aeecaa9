"""Helpers of the web page tests: a real ``malerei serve`` process (started by the service
tests' helper, tests/serve/serving.py), a browser tab that records console errors, screenshots,
signing in."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.serving import Server, malerei_argv  # tests/serve/serving.py: one server launcher for both

HERE = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("MALEREI_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MALEREI_WEB_ARTIFACTS", HERE / "artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
MODEL = "tiny-sd1"


# --------------------------------------------------------------------------- the server
@dataclass
class WebServer(Server):
    """The service tests' :class:`Server` (tests/serve/serving.py: start, poll /healthz, stop)
    running the real ``python -m malerei serve`` with the web tests' models and default model."""

    models_dir: Path | None = None
    launcher: Callable[..., list[str]] = malerei_argv

    def __post_init__(self) -> None:
        self.args = ["--models-dir", str(self.models_dir), "--default-model", MODEL, *self.args]

    def start(self, timeout: float = 90.0) -> WebServer:
        super().start(timeout)
        return self

    def add_user(self, name: str, password: str, *, credits: int = 0, admin: bool = False) -> None:
        """A user made through the library on the server's database (as the admin CLI does)."""
        from malerei.serve import credits as ledger
        from malerei.serve.accounts.users import create_user
        from malerei.serve.db.session import Database

        db = Database(self.db_url)
        try:
            with db.write() as session:
                user = create_user(session, name, password=password, is_admin=admin)
                if credits:
                    ledger.grant(session, user, credits, note="test")
        finally:
            db.dispose()


class Tab:
    """A page in a fresh browser context, with its console errors recorded."""

    def __init__(self, context, page) -> None:
        self.context = context
        self.page = page
        self.errors: list[str] = []
        self.allowed: list[re.Pattern] = []
        page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def allow_http_error(self, status: int) -> None:
        """The test causes an HTTP error status on purpose; Chromium logs it as a console error."""
        self.allowed.append(re.compile(rf"Failed to load resource: the server responded with a status of {status}\b"))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.allowed)]


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def screenshot(page, name: str) -> Path:
    """Save a screenshot for a person to look at (the artifacts dir)."""
    return _screenshot(page, name)


def sign_in(tab: Tab, server: WebServer, name: str, password: str) -> None:
    """Open the page and sign in through the form; returns once the Generate view is ready."""
    from playwright.sync_api import expect

    page = tab.page
    page.goto(server.url + "/")
    form = page.locator("#view-signin")
    form.get_by_label("User name").fill(name)
    form.get_by_label("Password").fill(password)
    form.get_by_role("button", name="Sign in").click()
    expect(page.locator("#username")).to_have_text(name)
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#model option")).not_to_have_count(0)


def notice(page, text: str | re.Pattern):
    """The message at the top of the page containing ``text``."""
    return page.locator("#notices .notice").filter(has_text=text)


def fill_txt2img(page, prompt: str, *, steps: int = 2, size: int = 64, seed: int | None = None,
                 batch: int = 1) -> None:
    page.locator("#view-generate").get_by_label("Text to image").check()
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Width", exact=True).fill(str(size))
    page.get_by_label("Height", exact=True).fill(str(size))
    page.get_by_label("Batch size", exact=True).fill(str(batch))
    page.get_by_label("Seed (−1: random)").fill(str(-1 if seed is None else seed))


def shown_job(page) -> str | None:
    """The id of the job whose images the Generate view shows."""
    return page.locator("#results").get_attribute("data-job")


def wait_result(page, previous: str | None, timeout_ms: int = 120_000):
    """Waits until the Generate view shows a job other than ``previous`` (and none is running);
    returns the detail of its (first) image."""
    page.wait_for_function(
        """prev => { const r = document.querySelector('#results');
                     return r.dataset.job && r.dataset.job !== prev && document.querySelector('#progress').hidden; }""",
        arg=previous or "", timeout=timeout_ms)
    return page.locator("#result-detail")


def generate(page, timeout_ms: int = 120_000):
    """Clicks Generate and waits for the new result; returns its detail."""
    previous = shown_job(page)
    page.get_by_role("button", name="Generate").click()
    return wait_result(page, previous, timeout_ms)


def recipe_value(detail, label: str) -> str:
    return detail.locator(f"dl.recipe dt:text-is('{label}') + dd").inner_text()


def decode_data_url(url: str):
    """A PIL image from a ``data:image/png;base64,...`` URL."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def png_image(size: int = 64, *, noise: bool = False, color=(200, 40, 40)) -> bytes:
    """PNG bytes: a flat colour with a square in it, or random noise (which compresses badly)."""
    import io

    import numpy as np
    from PIL import Image

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (size, size), color)
        image.paste((30, 60, 220), (size // 4, size // 4, size // 2, size // 2))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
