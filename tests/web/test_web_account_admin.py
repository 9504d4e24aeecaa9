"""Account and admin pages: API keys shown once and revoked, users added, credits granted,
registration opened and closed; the gallery's paging and delete."""

from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import expect

from webtools import notice, sign_in


def test_api_key_is_shown_once_works_and_is_revoked(server, user, tab):
    page = tab.page
    name, _ = user
    sign_in(tab, server, *user)
    page.get_by_role("link", name="Account").click()
    expect(page.locator("#acct-balance")).to_have_text("1000")
    expect(page.locator("#ledger-rows")).to_contain_text("+1000")
    expect(page.locator("#key-rows")).to_have_text("No API keys.")
    page.get_by_label("Key name").fill("my script")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key-value")).to_have_text(re.compile(r"^mk_\w+_\S+$"))
    key = page.locator("#new-key-value").inner_text()
    row = page.locator("#key-rows tr", has_text="my script")
    expect(row).to_have_count(1)
    assert httpx.get(server.url + "/v1/account", headers={"Authorization": f"Bearer {key}"}).json()["name"] == name

    page.reload()  # shown once: not after coming back
    expect(page.locator("#key-rows tr", has_text="my script")).to_have_count(1)
    expect(page.locator("#new-key")).to_be_hidden()
    assert key not in page.content()

    page.get_by_role("button", name="Revoke key my script").click()
    expect(notice(page, "Key my script revoked.")).to_be_visible()
    expect(page.locator("#key-rows")).to_have_text("No API keys.")
    assert httpx.get(server.url + "/v1/account", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_admin_adds_users_and_opens_registration(server, new_tab):
    admin = new_tab()
    page = admin.page
    sign_in(admin, server, "root", "root-password")
    page.get_by_role("link", name="Admin").click()
    expect(page.get_by_role("rowheader", name="root")).to_be_visible()

    # add a user who can sign in with the password the admin chose
    form = page.locator("#adduser-form")
    form.get_by_label("User name").fill("carol")
    form.get_by_label("Password (8+ characters; empty: API keys only)").fill("carol-password")
    form.get_by_role("button", name="Add user").click()
    expect(notice(page, "User carol added.")).to_be_visible()
    carol_row = page.locator("#user-rows tr", has=page.get_by_role("rowheader", name="carol"))
    expect(carol_row.locator(".balance")).to_have_text("0")
    carol_row.get_by_label("Credits to grant carol").fill("25")
    carol_row.get_by_role("button", name="Grant").click()
    expect(carol_row.locator(".balance")).to_have_text("25")
    admin.allow_http_error(409)
    form.get_by_label("User name").fill("carol")
    form.get_by_role("button", name="Add user").click()
    expect(notice(page, "already exists")).to_have_text("user 'carol' already exists.×")

    carol = new_tab()
    sign_in(carol, server, "carol", "carol-password")
    expect(carol.page.locator("#credits-value")).to_have_text("25")
    expect(carol.page.get_by_role("link", name="Admin")).to_be_hidden()
    carol.page.goto(server.url + "/#/admin")  # not an admin: back to Generate
    expect(carol.page.locator("#view-generate")).to_be_visible()
    expect(carol.page.locator("#view-admin")).to_be_hidden()

    # registration: closed by default
    visitor = new_tab()
    visitor.page.goto(server.url + "/")
    expect(visitor.page.locator("#view-signin")).to_be_visible()
    expect(visitor.page.get_by_role("link", name="Create one")).to_be_hidden()

    signup = page.locator("#signup-form")
    signup.get_by_label("Anyone who can reach this page may create an account").check()
    signup.get_by_label("Credits for a new account").fill("40")
    signup.get_by_role("button", name="Save").click()
    expect(notice(page, "Registration is open.")).to_be_visible()

    visitor.page.reload()
    visitor.page.get_by_role("link", name="Create one").click()
    reg = visitor.page.locator("#view-register")
    reg.get_by_label("User name (letters, digits, _ . -)").fill("newcomer")
    reg.get_by_label("Password (at least 8 characters)").fill("newcomer-pw")
    reg.get_by_label("Repeat the password").fill("newcomer-pw")
    reg.get_by_role("button", name="Create account").click()
    expect(visitor.page.locator("#username")).to_have_text("newcomer")
    expect(visitor.page.locator("#credits-value")).to_have_text("40")
    expect(visitor.page.get_by_role("link", name="Admin")).to_be_hidden()

    signup.get_by_label("Anyone who can reach this page may create an account").uncheck()
    signup.get_by_role("button", name="Save").click()
    expect(notice(page, "Registration is closed.")).to_be_visible()
    late = new_tab()
    late.page.goto(server.url + "/#/register")
    expect(late.page.locator("#view-signin")).to_be_visible()
    expect(late.page.get_by_role("link", name="Create one")).to_be_hidden()
    closed = httpx.post(server.url + "/v1/web/register", json={"name": "latecomer", "password": "latecomer-pw"})
    assert closed.status_code == 403 and closed.json()["error"]["code"] == "registration_closed"


def test_gallery_pages_and_deletes(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    # 26 images in 4 jobs, submitted with the browser's own session
    ids = []
    for batch in (8, 8, 8, 2):
        r = page.request.post(server.url + "/v1/jobs", data={"prompt": f"tile batch of {batch}", "width": 64,
                                                              "height": 64, "steps": 1, "batch_size": batch})
        assert r.status == 202, r.text()
        ids.append(r.json()["id"])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        states = [page.request.get(f"{server.url}/v1/jobs/{i}").json()["status"] for i in ids]
        if all(s == "succeeded" for s in states):
            break
        assert not any(s in ("failed", "cancelled") for s in states), states
        time.sleep(0.5)
    page.get_by_role("link", name="Gallery").click()
    tiles = page.locator("#gallery-grid li")
    expect(tiles).to_have_count(24)
    expect(tiles.first).to_contain_text("tile batch of 2")  # newest first
    page.get_by_role("button", name="Load more").click()
    expect(tiles).to_have_count(26)
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()

    first = tiles.first
    image_id = first.get_attribute("data-id")
    first.get_by_role("button").click()
    viewer = page.locator("#viewer")
    viewer.get_by_role("button", name="Delete").click()
    viewer.get_by_role("button", name="Keep it").click()
    expect(viewer).to_be_visible()
    viewer.get_by_role("button", name="Delete").click()
    viewer.get_by_role("button", name="Yes, delete it").click()
    expect(viewer).to_be_hidden()
    expect(notice(page, "Image deleted.")).to_be_visible()
    expect(tiles).to_have_count(25)
    assert page.request.get(f"{server.url}/v1/images/{image_id}").status == 404
    page.reload()
    expect(tiles).to_have_count(24)
    expect(page.locator(f"#gallery-grid li[data-id='{image_id}']")).to_have_count(0)
