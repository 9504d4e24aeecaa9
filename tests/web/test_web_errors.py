"""Every error the API returns reaches the person as a clear message: out of credits (and the
admin's grant fixing it), rate limited, too large, unsupported file, the session ending."""

from __future__ import annotations

import json

from playwright.sync_api import expect

from webtools import fill_txt2img, generate, notice, png_image, sign_in


def test_out_of_credits_until_an_admin_grants_some(server, new_tab):
    server.add_user("penniless", "penniless-password", credits=0)
    person = new_tab()
    page = person.page
    sign_in(person, server, "penniless", "penniless-password")
    expect(page.locator("#credits-value")).to_have_text("0")
    fill_txt2img(page, "a blue square", steps=2)
    person.allow_http_error(402)
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Out of credits")).to_have_text(
        "Out of credits: this job costs 1 credits but the balance is 0. Ask an admin for more credits.×")
    expect(page.locator("#progress")).to_be_hidden()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    # the admin grants credits on the admin page
    admin = new_tab()
    sign_in(admin, server, "root", "root-password")
    admin.page.get_by_role("link", name="Admin").click()
    row = admin.page.locator("#user-rows tr", has=admin.page.get_by_role("rowheader", name="penniless"))
    row.get_by_label("Credits to grant penniless").fill("5")
    row.get_by_role("button", name="Grant").click()
    expect(row.locator(".balance")).to_have_text("5")
    expect(notice(admin.page, "penniless now has 5 credits.")).to_be_visible()

    # now the same click works, and the header shows what is left
    generate(page)
    expect(page.locator("#credits-value")).to_have_text("4")


def test_rate_limit_too_large_and_unsupported_file_are_explained(server, user, tab, tmp_path):
    page = tab.page
    sign_in(tab, server, *user)
    fill_txt2img(page, "a red circle", steps=2)

    # rate limited: the answer the service gives (native error body, Retry-After)
    def limited(route):
        if route.request.method != "POST":
            route.continue_()
            return
        route.fulfill(status=429, headers={"Retry-After": "7", "Content-Type": "application/json"},
                      body=json.dumps({"error": {"code": "rate_limited", "message": "too many requests"}}))

    page.route("**/v1/jobs", limited)
    tab.allow_http_error(429)
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Rate limited")).to_have_text("Rate limited: too many requests. Try again in 7 s.×")
    page.unroute("**/v1/jobs")

    # too large: a real 413 from the service (the test server accepts uploads up to 60000 bytes)
    page.get_by_role("radio", name="Image to image").check()
    big = tmp_path / "noise.png"
    big.write_bytes(png_image(160, noise=True))
    assert big.stat().st_size > 60000
    page.locator("#source-file").set_input_files(big)
    expect(notice(page, "the server accepts at most 60000")).to_be_visible()
    expect(page.locator("#source-info")).to_have_text("Source: 160 × 160.")
    tab.allow_http_error(413)
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Too large")).to_contain_text("Too large: init_image is larger than 60000 bytes.")

    # a GIF shows in the browser, but the service takes PNG, JPEG and WebP only: a real 415
    from PIL import Image

    gif = tmp_path / "flat.gif"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(gif, format="GIF")
    page.locator("#source-file").set_input_files(gif)
    expect(page.locator("#source-info")).to_have_text("Source: 32 × 32.")
    tab.allow_http_error(415)
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Unsupported file")).to_contain_text("init_image is not a PNG, JPEG or WebP file")


def test_an_ended_session_goes_back_to_sign_in(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    tab.context.clear_cookies()  # as when the session expires or is signed out elsewhere
    tab.allow_http_error(401)
    page.get_by_role("link", name="Gallery").click()
    expect(page.locator("#view-signin")).to_be_visible()
    expect(notice(page, "Your session has ended. Please sign in again.")).to_be_visible()
    expect(page.locator("#topbar")).to_be_hidden()
