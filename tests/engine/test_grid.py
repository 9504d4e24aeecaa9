"""X/Y/Z plot: axis syntax (A1111 ranges), checks, and the labelled layout."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from malerei.engine import grid
from malerei.engine.errors import InvalidParameter


@pytest.mark.parametrize("text, kind, values", [
    ("steps:10,20,30", "steps", (10, 20, 30)),
    ("steps: 1-5", "steps", (1, 2, 3, 4, 5)),
    ("steps:10-20 (+5)", "steps", (10, 15, 20)),
    ("seed:1-10 [4]", "seed", (1, 4, 7, 10)),
    ("cfg:3-9 (+3), 12", "cfg", (3.0, 6.0, 9.0, 12.0)),
    ("CFG Scale:1-2 [3]", "cfg", (1.0, 1.5, 2.0)),
    ("strength:0.25,0.5", "strength", (0.25, 0.5)),
    ('sampler:Euler a,"DPM++ 2M, odd"', "sampler", ("Euler a", "DPM++ 2M, odd")),
    ("Prompt S/R:red,green", "prompt", ("red", "green")),
    ("steps:5-1 (-2)", "steps", (5, 3, 1)),
])
def test_parse_axis(text, kind, values):
    axis = grid.parse_axis(text)
    assert axis.kind == kind and axis.values == values


@pytest.mark.parametrize("text, words", [
    ("steps", "TYPE:VALUES"),
    ("colour:red", "unknown axis type"),
    ("steps:", "no values"),
    ("steps:ten", "not a whole number"),
    ("steps:1-5 (-1)", "wrong way"),
    ("seed:1-1000", "more than"),
])
def test_bad_axes(text, words):
    with pytest.raises(InvalidParameter, match=words):
        grid.parse_axis(text)


def test_check_axes():
    steps, again = grid.parse_axis("steps:1,2"), grid.parse_axis("steps:3")
    with pytest.raises(InvalidParameter, match="used twice"):
        grid.check_axes([steps, again, None], "p", has_image=False)
    with pytest.raises(InvalidParameter, match="does not occur"):
        grid.check_axes([grid.parse_axis("prompt:cat,dog"), None, None], "a red circle", has_image=False)
    with pytest.raises(InvalidParameter, match="input image"):
        grid.check_axes([grid.parse_axis("strength:0.5"), None, None], "p", has_image=False)
    with pytest.raises(InvalidParameter, match="cells"):
        grid.check_axes([grid.parse_axis("seed:1-64"), grid.parse_axis("steps:1-5"), None], "p", has_image=False)
    grid.check_axes([grid.parse_axis("prompt:red,blue"), steps, None], "a red circle", has_image=False)


def test_apply_and_labels():
    fields = {"prompt": "a red circle on a red background", "negative_prompt": "red"}
    axis = grid.parse_axis("prompt:red,blue")
    grid.apply(axis, "blue", fields, fields["prompt"])
    assert fields["prompt"] == "a blue circle on a blue background" and fields["negative_prompt"] == "blue"
    cfg = grid.parse_axis("cfg:7.5")
    grid.apply(cfg, 7.5, fields, "")
    assert fields["cfg_scale"] == 7.5 and cfg.text(7.5) == "CFG scale: 7.5" and axis.text("blue") == "blue"


def test_draw_grid_layout():
    colours = [[[Image.new("RGB", (32, 32), (10 * x + 100 * z, 50 * y, 0)) for x in range(3)] for y in range(2)]
               for z in range(2)]
    sheet = grid.draw_grid(colours, x_labels=["a", "b", "c"], y_labels=["row one", "row two"], z_labels=["z1", "z2"])
    assert sheet.width > 2 * 3 * 32 and sheet.height > 2 * 32
    # Every cell is pasted unchanged somewhere: find the bottom-right cell of the second plane.
    pixels = list(sheet.getdata())
    assert (10 * 2 + 100, 50, 0) in pixels and (0, 0, 0) in pixels
    plain = grid.draw_grid([[[colours[0][0][0]]]], x_labels=[], y_labels=[], z_labels=[])
    assert plain.size == (32, 32)


def test_hires_options_for_generate():
    from malerei.commands import edit

    parser = argparse.ArgumentParser()
    edit.add_hires_options(parser)
    assert edit.hires_options(parser.parse_args([])) is None
    options = edit.hires_options(parser.parse_args(["--hires-scale", "2", "--hires-strength", "0.4"]))
    assert (options.scale, options.upscaler, options.strength, options.steps) == (2.0, "Latent", 0.4, None)
    with pytest.raises(InvalidParameter, match="hires scale"):
        edit.hires_options(parser.parse_args(["--hires-scale", "9"]))
