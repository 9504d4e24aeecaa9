"""A1111's X/Y/Z plot: axes of parameter values, and the labelled grid image.

An axis is ``TYPE:VALUES``: ``steps:10,20,30``, ``cfg:3-9 (+3)``, ``seed:1-10 [4]``,
``sampler:Euler,DPM++ 2M``, ``prompt:red,green,blue`` (prompt search/replace: the first value is
searched in the prompt and each value in turn replaces it), ``model:a,b``, ``strength:0.3,0.6``
(img2img denoising strength), ``scheduler:Automatic,Karras``.

Values are comma-separated (double quotes protect commas, as in A1111's CSV). Numeric axes take
A1111's ranges: ``a-b`` (step 1), ``a-b (+s)`` / ``a-b (-s)`` (step s), ``a-b [n]`` (n values,
evenly spaced, ends included).

:func:`draw_grid` lays the cell images out with X labels above the columns, Y labels left of the
rows, and one such grid per Z value side by side under a Z title.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from malerei.engine.errors import InvalidParameter

if TYPE_CHECKING:
    import PIL.Image

# axis type -> (label in the picture, value kind)
AXIS_TYPES: dict[str, tuple[str, str]] = {
    "sampler": ("Sampler", "str"),
    "scheduler": ("Schedule type", "str"),
    "steps": ("Steps", "int"),
    "cfg": ("CFG scale", "float"),
    "seed": ("Seed", "int"),
    "strength": ("Denoising strength", "float"),
    "model": ("Model", "str"),
    "prompt": ("Prompt S/R", "str"),
}
_ALIASES = {"cfg scale": "cfg", "cfg_scale": "cfg", "denoising": "strength", "denoising strength": "strength",
            "prompt s/r": "prompt", "prompt sr": "prompt", "schedule type": "scheduler", "checkpoint": "model",
            "checkpoint name": "model"}
MAX_VALUES = 64
MAX_CELLS = 256

_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*-\s*([+-]?\d+(?:\.\d+)?)\s*(?:\(([+-]\d+(?:\.\d+)?)\)|\[(\d+)\])?\s*$")


@dataclass(frozen=True)
class Axis:
    kind: str  # a key of AXIS_TYPES
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        return AXIS_TYPES[self.kind][0]

    def text(self, value) -> str:
        """A cell label: ``Steps: 20``; for prompt S/R the value alone."""
        from malerei.engine.metadata import format_value

        if self.kind == "prompt":
            return str(value)
        shown = format_value(float(value)) if isinstance(value, float) else str(value)
        return f"{self.label}: {shown}"


def _split(values: str) -> list[str]:
    row = next(csv.reader([values], skipinitialspace=True), [])
    return [v.strip() for v in row if v.strip()]


def _expand(item: str, kind: str) -> list:
    match = _RANGE.match(item)
    number = int if kind == "int" else float
    if match:
        start, end = number(float(match.group(1))), number(float(match.group(2)))
        if match.group(4) is not None:
            count = int(match.group(4))
            if count < 1 or count > MAX_VALUES:
                raise InvalidParameter(f"range {item!r}: count must be 1..{MAX_VALUES}")
            if count == 1:
                return [start]
            step = (end - start) / (count - 1)
            return [number(round(start + step * i, 6)) if kind == "float" else int(round(start + step * i))
                    for i in range(count)]
        step = number(float(match.group(3))) if match.group(3) else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise InvalidParameter(f"range {item!r}: the step goes the wrong way or is 0")
        out, value = [], start
        while (value <= end + 1e-9) if step > 0 else (value >= end - 1e-9):
            out.append(number(round(value, 6)) if kind == "float" else value)
            value += step
            if len(out) > MAX_VALUES:
                raise InvalidParameter(f"range {item!r} has more than {MAX_VALUES} values")
        return out
    try:
        return [number(item)]
    except ValueError:
        raise InvalidParameter(f"{item!r} is not a {'whole number' if kind == 'int' else 'number'}") from None


def parse_axis(text: str) -> Axis:
    """``TYPE:VALUES`` -> :class:`Axis` (values parsed and range-expanded, not yet checked against a model)."""
    if ":" not in text:
        raise InvalidParameter(f"axis {text!r} must be TYPE:VALUES, e.g. steps:10,20; types: {', '.join(AXIS_TYPES)}")
    head, _, values = text.partition(":")
    kind = _ALIASES.get(head.strip().lower(), head.strip().lower())
    if kind not in AXIS_TYPES:
        raise InvalidParameter(f"unknown axis type {head.strip()!r}; allowed: {', '.join(AXIS_TYPES)}")
    items = _split(values)
    if not items:
        raise InvalidParameter(f"axis {kind} has no values")
    value_kind = AXIS_TYPES[kind][1]
    parsed: list = []
    if value_kind == "str":
        parsed = items
    else:
        for item in items:
            parsed += _expand(item, value_kind)
    if len(parsed) > MAX_VALUES:
        raise InvalidParameter(f"axis {kind} has {len(parsed)} values; at most {MAX_VALUES} are allowed")
    return Axis(kind=kind, values=tuple(parsed))


def check_axes(axes: list[Axis | None], prompt: str, *, has_image: bool) -> None:
    """Rules that need the whole plot: no type twice, prompt S/R finds its text, strength needs an image."""
    present = [a for a in axes if a is not None]
    kinds = [a.kind for a in present]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise InvalidParameter(f"axis type {kind} is used twice; each type may vary on one axis only")
    cells = 1
    for axis in present:
        cells *= len(axis.values)
        if axis.kind == "prompt" and axis.values[0] not in prompt:
            raise InvalidParameter(f"prompt S/R: {axis.values[0]!r} (the first value) does not occur in the prompt")
        if axis.kind == "strength" and not has_image:
            raise InvalidParameter("a denoising strength axis needs an input image (--init IMAGE)")
    if cells > MAX_CELLS:
        raise InvalidParameter(f"the plot has {cells} cells; at most {MAX_CELLS} are allowed")


def apply(axis: Axis, value, fields: dict, prompt_source: str) -> None:
    """Put one axis value into the cell's settings: GenerationParams fields plus ``strength`` and ``model``."""
    if axis.kind == "prompt":
        search = axis.values[0]
        fields["prompt"] = fields["prompt"].replace(search, value)
        fields["negative_prompt"] = fields.get("negative_prompt", "").replace(search, value)
    elif axis.kind == "cfg":
        fields["cfg_scale"] = value
    else:
        fields[{"strength": "strength", "model": "model"}.get(axis.kind, axis.kind)] = value


# ---------------------------------------------------------------------------------------------
# Drawing


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if line and _text_size(draw, trial, font)[0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def draw_grid(cells: list[list[list[PIL.Image.Image]]], *, x_labels: list[str], y_labels: list[str],
              z_labels: list[str]) -> PIL.Image.Image:
    """``cells[z][y][x]`` (equal-sized images) as one labelled picture (see the module docstring)."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = cells[0][0][0].size
    font_size = max(12, min(cell_w, cell_h) // 12)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + font_size // 3
    wrapped_x = [_wrap(probe, t, font, cell_w - 8) for t in x_labels]
    top = (max((len(w) for w in wrapped_x), default=0) * line_h + 8) if any(x_labels) else 0
    left = (min(max((_text_size(probe, t, font)[0] for t in y_labels), default=0) + 16, cell_w * 2)
            if any(y_labels) else 0)
    wrapped_y = [_wrap(probe, t, font, max(left - 12, 8)) for t in y_labels]
    title = (line_h + 10) if any(z_labels) else 0
    nx, ny = len(x_labels) or 1, len(y_labels) or 1
    one_w, one_h = left + nx * cell_w, title + top + ny * cell_h
    gap = cell_w // 4 if len(cells) > 1 else 0
    sheet = Image.new("RGB", (len(cells) * one_w + (len(cells) - 1) * gap, one_h), "white")
    draw = ImageDraw.Draw(sheet)
    for z, plane in enumerate(cells):
        ox = z * (one_w + gap)
        if title and z < len(z_labels):
            tw, _ = _text_size(draw, z_labels[z], font)
            draw.text((ox + left + (nx * cell_w - tw) // 2, 4), z_labels[z], fill="black", font=font)
        for xi, lines in enumerate(wrapped_x):
            for li, line in enumerate(lines):
                tw, _ = _text_size(draw, line, font)
                draw.text((ox + left + xi * cell_w + (cell_w - tw) // 2, title + 4 + li * line_h), line,
                          fill="black", font=font)
        for yi, lines in enumerate(wrapped_y):
            y0 = title + top + yi * cell_h + (cell_h - len(lines) * line_h) // 2
            for li, line in enumerate(lines):
                tw, _ = _text_size(draw, line, font)
                draw.text((ox + left - tw - 8, y0 + li * line_h), line, fill="black", font=font)
        for yi, row in enumerate(plane):
            for xi, image in enumerate(row):
                sheet.paste(image.convert("RGB"), (ox + left + xi * cell_w, title + top + yi * cell_h))
    return sheet
