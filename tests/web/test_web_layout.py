"""Every view at desktop (1280) and phone (390) width: nothing overflows sideways, every control
has a label, the keyboard reaches what matters. Screenshots of each view land in the artifacts
dir for a person to look at."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from webtools import DESKTOP, PHONE, fill_txt2img, generate, png_image, screenshot, sign_in

UNLABELLED = """() => {
  const visible = el => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
  const named = el => {
    const labels = el.labels ? [...el.labels].map(l => l.textContent).join(' ').trim() : '';
    return labels || (el.getAttribute('aria-label') || '').trim() ||
           (el.matches('button, a') ? el.textContent.trim() : '');
  };
  return [...document.querySelectorAll('input, select, textarea, button, a[href], canvas')]
    .filter(el => visible(el) || (el.type === 'file' && visible(el.parentElement)))
    .filter(el => !named(el)).map(el => el.outerHTML.slice(0, 100));
}"""


def check_view(page, name: str, width: int) -> None:
    overflow = page.evaluate("() => document.documentElement.scrollWidth")
    assert overflow <= width, f"{name}: the page is {overflow} px wide in a {width} px window"
    assert page.evaluate(UNLABELLED) == [], f"{name}: controls without a label"
    screenshot(page, name)


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_views_fit_and_are_labelled(server, new_tab, size, tmp_path):
    viewport = DESKTOP if size == "desktop" else PHONE
    tab = new_tab(viewport)
    page = tab.page
    page.goto(server.url + "/")
    expect(page.locator("#view-signin")).to_be_visible()
    check_view(page, f"view-signin-{size}", viewport["width"])
    sign_in(tab, server, "root", "root-password")
    check_view(page, f"view-generate-{size}", viewport["width"])

    fill_txt2img(page, f"a small red circle for the {size} screenshot", steps=2, seed=5)
    generate(page)
    check_view(page, f"view-result-{size}", viewport["width"])

    page.get_by_role("radio", name="Inpaint").check()
    source = tmp_path / "source.png"
    source.write_bytes(png_image(64))
    page.locator("#source-file").set_input_files(source)
    expect(page.locator("#source-canvas")).to_be_visible()
    check_view(page, f"view-inpaint-{size}", viewport["width"])

    for view in ("gallery", "account", "admin"):
        page.get_by_role("link", name=view.capitalize()).click()
        expect(page.locator(f"#view-{view}")).to_be_visible()
        page.wait_for_load_state("networkidle")
        check_view(page, f"view-{view}-{size}", viewport["width"])

    page.get_by_role("link", name="Gallery").click()
    page.locator("#gallery-grid li").first.get_by_role("button").click()
    expect(page.locator("#viewer")).to_be_visible()
    check_view(page, f"view-viewer-{size}", viewport["width"])


def test_keyboard_reaches_the_form_and_starts_a_job(server, user, tab):
    page = tab.page
    sign_in(tab, server, *user)
    fill_txt2img(page, "typed", steps=1)
    page.locator("body").focus()
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    reached = []
    for _ in range(45):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("""() => { const el = document.activeElement;
            return el.id || (el.type === 'radio' ? 'mode:' + el.value : el.textContent.trim().slice(0, 30)); }"""))
    for target in ("Generate", "Gallery", "Account", "signout", "mode:txt2img", "prompt", "negative", "model",
                   "steps", "seed", "generate"):
        assert target in reached, f"{target} is not reachable with Tab: {reached}"

    # modes are a radio group: arrow keys move between them
    page.get_by_role("radio", name="Text to image").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("radio", name="Image to image")).to_be_checked()
    expect(page.locator("#drop")).to_be_visible()
    page.keyboard.press("ArrowLeft")
    expect(page.get_by_role("radio", name="Text to image")).to_be_checked()

    page.get_by_label("Prompt", exact=True).focus()
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST"):
        page.keyboard.press("Control+Enter")
    expect(page.locator("#job-status")).to_have_text("Finished: 1 image.", timeout=120_000)
