"""The Generate view beyond the main flow: cancel, batches, "use these settings", the mask
painter's tools, outpaint sides, dropping a file, and the form's own checks."""

from __future__ import annotations

import base64
import re

from playwright.sync_api import expect

from webtools import decode_data_url, fill_txt2img, generate, notice, png_image, recipe_value, sign_in


def test_cancel_stops_the_job_and_refunds(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    fill_txt2img(page, "a long job", steps=150)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-label")).to_have_text(re.compile(r"Step \d+ of 150"), timeout=60_000)
    expect(page.locator("#credits-value")).to_have_text("999")
    page.get_by_role("button", name="Cancel").click()
    expect(notice(page, "Cancelled.")).to_have_text("Cancelled. The credits were refunded.×", timeout=60_000)
    expect(page.locator("#progress")).to_be_hidden()
    expect(page.locator("#credits-value")).to_have_text("1000")
    expect(page.locator("#results")).to_be_hidden()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_batch_results_and_use_these_settings(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    fill_txt2img(page, "two small squares", steps=2, seed=77, batch=2)
    page.get_by_label("Negative prompt").fill("blurry")
    detail = generate(page)
    thumbs = page.locator("#result-thumbs button")
    expect(thumbs).to_have_count(2)
    assert recipe_value(detail, "Seed") == "77"
    thumbs.nth(1).click()
    expect(thumbs.nth(1)).to_have_attribute("aria-pressed", "true")
    second_seed = recipe_value(detail, "Seed")
    assert second_seed != "77"
    assert recipe_value(detail, "Negative prompt") == "blurry"

    # change the form, then take the second image's settings back
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Steps", exact=True).fill("9")
    page.get_by_label("Negative prompt").fill("")
    detail.get_by_role("button", name="Use these settings").click()
    expect(notice(page, "The form now has this image's settings.")).to_be_visible()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("two small squares")
    expect(page.get_by_label("Negative prompt")).to_have_value("blurry")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("2")
    expect(page.get_by_label("Seed (−1: random)")).to_have_value(second_seed)
    expect(page.get_by_label("Prompt", exact=True)).to_be_focused()

    # one click sends a result to Restore
    detail.get_by_role("button", name="Restore").click()
    expect(page.get_by_role("radio", name="Restore")).to_be_checked()
    expect(page.get_by_label("Restorer")).to_have_value("shapes-restore")  # the built-in one is preselected
    page.get_by_label("Restorer").select_option("tiny-restore")
    page.get_by_label("Restore strength").fill("0.5")
    page.get_by_role("button", name="Generate").click()
    restored = _outcome(page, "Restore")
    assert recipe_value(restored, "Restorer") == "tiny-restore"
    assert recipe_value(restored, "Restore strength") == "0.5"
    assert recipe_value(restored, "Size") == "64 × 64"


def test_a_job_failing_in_the_worker_says_why(server, user, tab, tmp_path):
    page = tab.page
    sign_in(tab, server, *user)
    page.get_by_role("radio", name="Upscale").check()
    source = tmp_path / "small.png"
    source.write_bytes(png_image(32))
    page.locator("#source-file").set_input_files(source)
    page.get_by_label("Upscaler").select_option("broken")  # installed, but not a model file
    page.get_by_role("button", name="Generate").click()
    failed = notice(page, "The job failed:")
    expect(failed).to_be_visible(timeout=120_000)
    expect(failed).to_contain_text("broken")
    expect(page.locator("#progress")).to_be_hidden()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.locator("#credits-value")).to_have_text("1000")  # a failed job is refunded


def _mask_pixel(page, fx: float, fy: float) -> list[int]:
    """RGBA of the visible canvas at a fraction of its size."""
    return page.evaluate("""([fx, fy]) => {
        const c = document.querySelector('#source-canvas');
        return Array.from(c.getContext('2d').getImageData(Math.floor(c.width * fx), Math.floor(c.height * fy), 1, 1).data);
    }""", [fx, fy])


def _dab(page, fx: float, fy: float) -> None:
    canvas = page.locator("#source-canvas")
    canvas.evaluate("c => c.scrollIntoView({block: 'center'})")  # clear of the sticky header
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 2, y + 2)
    page.mouse.up()


def test_mask_painter_brush_erase_undo_clear(server, user, tab, tmp_path):
    page = tab.page
    sign_in(tab, server, *user)
    page.get_by_role("radio", name="Inpaint").check()
    page.get_by_label("Prompt", exact=True).fill("a patch")
    source = tmp_path / "flat.png"
    source.write_bytes(png_image(64, color=(200, 40, 40)))
    page.locator("#source-file").set_input_files(source)
    expect(page.locator("#source-info")).to_have_text("Source: 64 × 64. Paint the area to repaint.")
    expect(page.get_by_label("Brush")).to_have_value("5")  # fitted to a 64 px image

    # an empty mask is refused by the page itself, before any request
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/jobs") else None)
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Paint the area to repaint")).to_be_visible()
    assert requests == []

    plain = _mask_pixel(page, 0.9, 0.9)
    assert plain[:3] == [200, 40, 40]
    page.get_by_label("Brush").fill("10")
    _dab(page, 0.9, 0.9)                 # stroke A (bottom right, on the flat red)
    painted = _mask_pixel(page, 0.9, 0.9)
    assert painted != plain
    _dab(page, 0.1, 0.9)                 # stroke B (bottom left)
    assert _mask_pixel(page, 0.1, 0.9) == painted
    page.get_by_role("button", name="Undo").click()
    assert _mask_pixel(page, 0.1, 0.9) == plain   # B undone
    assert _mask_pixel(page, 0.9, 0.9) == painted  # A kept
    page.get_by_label("Erase").check()
    _dab(page, 0.9, 0.9)
    assert _mask_pixel(page, 0.9, 0.9) == plain    # erased
    expect(page.locator("#source-info")).to_contain_text("Paint the area to repaint.")
    page.get_by_label("Erase").uncheck()
    _dab(page, 0.1, 0.1)
    page.get_by_role("button", name="Clear mask").click()
    assert _mask_pixel(page, 0.1, 0.1)[:3] != painted[:3]
    page.get_by_role("button", name="Undo").click()  # a clear can be undone too
    assert _mask_pixel(page, 0.1, 0.1)[:3] == painted[:3]

    # what is sent: the mask is white exactly where the visible overlay is
    page.get_by_label("Steps", exact=True).fill("2")
    page.get_by_label("Mask blur").fill("0")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    mask = decode_data_url(body["mask_image"]).convert("L")
    assert mask.size == (64, 64) and body["mask_blur"] == 0
    assert mask.getpixel((6, 6)) == 255 and mask.getpixel((57, 57)) == 0 and mask.getpixel((6, 57)) == 0
    init = decode_data_url(body["init_image"]).convert("RGB")
    assert init.getpixel((60, 60)) == (200, 40, 40)   # the original pixels, not the overlay
    _outcome(page, "Inpaint")


def test_outpaint_by_drop_and_img2img(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    page.get_by_role("radio", name="Outpaint").check()
    # drop a file on the drop zone, as a person drags one from their desktop
    data = base64.b64encode(png_image(48)).decode()
    transfer = page.evaluate_handle("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        return dt;
    }""", data)
    page.locator("#drop").dispatch_event("drop", {"dataTransfer": transfer})
    expect(page.locator("#source-info")).to_contain_text("Source: 48 × 48.")
    sides = page.get_by_role("group", name="Extend the image")
    sides.get_by_label("Right").uncheck()
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Choose at least one side to extend.")).to_be_visible()
    sides.get_by_label("Left").check()
    sides.get_by_label("Top").check()
    sides.get_by_label("by").fill("16")
    expect(page.locator("#source-info")).to_have_text("Source: 48 × 48. Result: 64 × 64.")
    page.get_by_label("Prompt", exact=True).fill("more of the same")
    page.get_by_label("Steps", exact=True).fill("2")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert (body["kind"], body["left"], body["top"], body["right"], body["bottom"]) == ("outpaint", 16, 16, 0, 0)
    detail = _outcome(page, "Outpaint")
    assert recipe_value(detail, "Size") == "64 × 64"

    page.get_by_role("radio", name="Image to image").check()
    expect(page.locator("#source-info")).to_have_text("Source: 48 × 48.")
    page.get_by_label("Strength", exact=True).fill("0.5")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["kind"] == "img2img"
    detail = _outcome(page, "Image to image")
    assert recipe_value(detail, "Size") == "48 × 48" and recipe_value(detail, "Strength") == "0.5"


def test_the_form_checks_its_numbers(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    requests = []
    page.on("request", lambda r: requests.append(r) if r.url.endswith("/v1/jobs") else None)
    fill_txt2img(page, "x", steps=2)
    page.get_by_label("Width", exact=True).fill("100")
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Width must be a multiple of 8; it is 100.")).to_be_visible()
    expect(page.get_by_label("Width", exact=True)).to_be_focused()
    page.get_by_label("Width", exact=True).fill("64")
    page.get_by_label("Steps", exact=True).fill("0")
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Steps must be from 1 to 150; it is 0.")).to_be_visible()
    page.get_by_role("radio", name="Image to image").check()
    page.get_by_role("button", name="Generate").click()
    expect(notice(page, "Choose or drop an image first.")).to_be_visible()
    assert requests == []


def _outcome(page, label: str):
    """The job ran and its result (of kind ``label``) is shown; returns the result's detail."""
    detail = page.locator("#result-detail")
    expect(detail.locator("dl.recipe dt:text-is('Kind') + dd")).to_have_text(label, timeout=120_000)
    expect(notice(page, "The job failed")).to_have_count(0)
    return detail
