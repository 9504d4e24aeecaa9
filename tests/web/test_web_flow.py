"""A person's whole flow on a just-installed server: create the first admin, sign out and in
(a wrong password first), generate while previews stream in, download the PNG, find the image in
the gallery, paint a mask and inpaint it, send it to upscale.
"""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import expect

from webtools import decode_data_url, fill_txt2img, notice, recipe_value, screenshot, wait_result


def test_first_run_to_inpaint_and_upscale(fresh_server, tab, tmp_path):
    page = tab.page
    page.goto(fresh_server.url + "/")

    # --- first run: the page offers to create the admin account
    setup = page.locator("#view-setup")
    expect(setup.get_by_role("heading", name="Welcome to malerei")).to_be_visible()
    setup.get_by_label("User name").fill("ada")
    setup.get_by_label("Password (at least 8 characters)").fill("lovelace-1843")
    setup.get_by_label("Repeat the password").fill("lovelace-1844")
    setup.get_by_role("button", name="Create admin account").click()
    expect(setup.locator(".form-error")).to_have_text("The two passwords differ.")
    setup.get_by_label("Repeat the password").fill("lovelace-1843")
    setup.get_by_label("Your starting credits").fill("500")
    setup.get_by_role("button", name="Create admin account").click()
    expect(page.locator("#username")).to_have_text("ada")
    expect(page.locator("#credits-value")).to_have_text("500")
    expect(page.get_by_role("link", name="Admin")).to_be_visible()
    again = httpx.post(fresh_server.url + "/v1/web/setup", json={"name": "mallory", "password": "mallory-pw"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_set_up"  # once only

    # --- sign out; a wrong password is refused with a clear message; the right one works
    page.get_by_role("button", name="Sign out").click()
    signin = page.locator("#view-signin")
    expect(signin).to_be_visible()
    tab.allow_http_error(401)
    signin.get_by_label("User name").fill("ada")
    signin.get_by_label("Password").fill("not-her-password")
    signin.get_by_role("button", name="Sign in").click()
    expect(signin.locator(".form-error")).to_have_text("Wrong user name or password.")
    expect(page.locator("#topbar")).to_be_hidden()
    signin.get_by_label("Password").fill("lovelace-1843")
    signin.get_by_role("button", name="Sign in").click()
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.locator("#model")).to_have_value("tiny-sd1")

    # --- generate with Ctrl+Enter: progress and live previews stream in, then the result
    fill_txt2img(page, "a red circle on a blue background", steps=40, seed=1234)
    page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard way to start
    expect(page.locator("#progress")).to_be_visible()
    expect(page.locator("#progress-label")).to_have_text(re.compile(r"Step \d+ of 40"), timeout=60_000)
    expect(page.locator("#preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,"), timeout=60_000)
    preview = decode_data_url(page.locator("#preview").get_attribute("src"))
    assert max(preview.size) <= 64
    screenshot(page, "flow-progress-desktop")
    detail = wait_result(page, None)
    assert recipe_value(detail, "Seed") == "1234"
    assert recipe_value(detail, "Prompt") == "a red circle on a blue background"
    assert recipe_value(detail, "Steps") == "40"
    assert recipe_value(detail, "Size") == "64 × 64"
    expect(page.locator("#credits-value")).not_to_have_text("500")  # charged, and the header knows
    balance_after_txt2img = int(page.locator("#credits-value").inner_text())
    assert balance_after_txt2img < 500

    # the seed can be reused
    page.get_by_role("button", name="Random").click()
    expect(page.get_by_label("Seed (−1: random)")).to_have_value("-1")
    page.get_by_role("button", name="Reuse last").click()
    expect(page.get_by_label("Seed (−1: random)")).to_have_value("1234")

    # --- download: the PNG carries its A1111 parameters and the malerei recipe
    with page.expect_download() as download:
        detail.get_by_role("link", name="Download PNG").click()
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    from PIL import Image

    with Image.open(saved) as png:
        assert png.format == "PNG" and png.size == (64, 64)
        assert "a red circle on a blue background" in png.info["parameters"]
        assert "Seed: 1234" in png.info["parameters"]
        assert "malerei" in png.info

    # --- gallery: the image is there, found by a word of its prompt, not by another
    page.get_by_role("link", name="Gallery").click()
    grid = page.locator("#gallery-grid li")
    expect(grid).to_have_count(1)
    page.get_by_label("Search prompts").fill("no-such-word")
    page.get_by_role("button", name="Search").click()
    expect(grid).to_have_count(0)
    expect(page.locator("#gallery-empty")).to_contain_text("No images whose prompt has")
    page.get_by_label("Search prompts").fill("CIRCLE")
    page.get_by_label("Search prompts").press("Enter")
    expect(grid).to_have_count(1)
    grid.first.get_by_role("button").click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    assert recipe_value(viewer, "Seed") == "1234"

    # --- send it to inpaint, paint a mask, inpaint
    viewer.get_by_role("button", name="Inpaint").click()
    expect(viewer).to_be_hidden()
    expect(page.locator("#view-generate")).to_be_visible()
    expect(page.get_by_role("radio", name="Inpaint")).to_be_checked()
    canvas = page.locator("#source-canvas")
    expect(canvas).to_be_visible()
    expect(page.locator("#source-info")).to_contain_text("Source: 64 × 64. Paint the area to repaint.")
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    expect(page.locator("#source-info")).to_contain_text("Mask painted.")
    page.get_by_label("Prompt", exact=True).fill("a green square")
    page.get_by_label("Steps", exact=True).fill("2")
    page.get_by_label("Strength", exact=True).fill("0.6")
    screenshot(page, "flow-inpaint-desktop")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["kind"] == "inpaint" and body["denoising_strength"] == 0.6
    init = decode_data_url(body["init_image"])
    mask = decode_data_url(body["mask_image"]).convert("L")
    assert init.size == mask.size == (64, 64)
    assert mask.getpixel((29, 29)) == 255     # on the stroke: repaint
    assert mask.getpixel((2, 2)) == 0         # far from it: keep
    assert mask.getpixel((60, 5)) == 0
    detail = expect_job_outcome(page, "inpaint", kind_label="Inpaint")
    assert recipe_value(detail, "Prompt") == "a green square"
    assert recipe_value(detail, "Strength") == "0.6"

    # --- send the first result to upscale
    page.get_by_role("link", name="Gallery").click()
    page.get_by_label("Search prompts").fill("red circle")
    page.get_by_role("button", name="Search").click()
    expect(grid).to_have_count(1)
    grid.first.get_by_role("button").click()
    viewer.get_by_role("button", name="Upscale").click()
    expect(page.get_by_role("radio", name="Upscale")).to_be_checked()
    expect(page.get_by_label("Upscaler")).to_have_value("shapes-x4")  # the built-in one is preselected
    page.get_by_label("Upscaler").select_option("4x-Tiny")
    expect(page.locator("#source-info")).to_contain_text("Result: 128 × 128.")
    page.get_by_role("button", name="Generate").click()
    detail = expect_job_outcome(page, "upscale", kind_label="Upscale")
    assert recipe_value(detail, "Size") == "128 × 128"
    assert recipe_value(detail, "Upscaler") == "4x-Tiny"
    expect(detail.locator("dl.recipe dt:text-is('Seed')")).to_have_count(0)  # no seed of its own
    expect(detail.get_by_role("button", name="Use these settings")).to_have_count(0)  # nothing to reuse


def expect_job_outcome(page, kind: str, *, kind_label: str):
    """The job of ``kind`` ran and its result is shown; returns the result's detail."""
    detail = page.locator("#result-detail")
    expect(detail.locator("dl.recipe dt:text-is('Kind') + dd")).to_have_text(kind_label, timeout=120_000)
    expect(detail.locator("figure img")).to_be_visible()
    expect(notice(page, "The job failed")).to_have_count(0)
    return detail
