"""``malerei serve --no-auth`` (loopback only): one local user, the page opens straight on
Generate with no sign-in, sign-out or credits."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from webtools import WebServer, fill_txt2img, generate, recipe_value


@pytest.fixture
def local_server(web_models_dir, tmp_path):
    srv = WebServer(data_dir=tmp_path, models_dir=web_models_dir, args=["--no-auth"]).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_no_sign_in_without_authentication(local_server, tab):
    page = tab.page
    page.goto(local_server.url + "/")
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#username")).to_have_text("local")
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    expect(page.locator("#credits")).to_be_hidden()
    page.goto(local_server.url + "/#/signin")  # nothing to sign in to
    expect(page.locator("#view-generate")).to_be_visible()
    fill_txt2img(page, "a local picture", steps=1, seed=3)
    detail = generate(page)
    assert recipe_value(detail, "Seed") == "3"
