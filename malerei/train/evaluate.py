"""The evaluator: generate the fixed prompt list, read each image back by SHAPES.md's rules.

Works with any generate function, so the same scoring serves the stock diffusers pipeline during
training, malerei's own pipeline (`malerei eval`), and the renderer itself (the ceiling).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from malerei.world.eval_set import EvalCase
from malerei.world.read import judge

GenerateFn = Callable[[list[str], list[int]], list[np.ndarray]]  # captions, seeds -> uint8 HxWx3 images


def score(cases: Sequence[EvalCase], images: Sequence[np.ndarray]) -> dict:
    """Per-attribute accuracy and adherence per group (seen / heldout / two)."""
    groups: dict[str, dict[str, list[bool]]] = {}
    per_case = []
    for case, image in zip(cases, images):
        j = judge(case.scene, image)
        g = groups.setdefault(case.group, {})
        for name, ok in j.attributes.items():
            g.setdefault(name, []).append(ok)
        g.setdefault("adherence", []).append(j.adheres)
        per_case.append({"caption": case.caption, "seed": case.seed, "group": case.group, **j.attributes, "adheres": j.adheres})
    summary = {group: {k: float(np.mean(v)) for k, v in attrs.items()} | {"n": len(attrs["adherence"])} for group, attrs in groups.items()}
    return {"summary": summary, "cases": per_case}


def run_eval(generate: GenerateFn, cases: Sequence[EvalCase], *, batch_size: int = 32, progress=None) -> tuple[dict, list[np.ndarray]]:
    images: list[np.ndarray] = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i : i + batch_size]
        images.extend(generate([c.caption for c in chunk], [c.seed for c in chunk]))
        if progress:
            progress(len(chunk))
    return score(cases, images), images


def diffusers_generate_fn(pipe, *, steps: int | None = None, cfg: float | None = None,
                          guidance_rescale: float | None = None) -> GenerateFn:
    """Generate with a stock diffusers StableDiffusionPipeline (used during training); by default
    with the steps, CFG and guidance rescale the exported model ships with."""
    import torch

    from malerei.train.export import MODEL_DEFAULTS

    steps = MODEL_DEFAULTS["steps"] if steps is None else steps
    cfg = MODEL_DEFAULTS["cfg_scale"] if cfg is None else cfg
    guidance_rescale = MODEL_DEFAULTS["guidance_rescale"] if guidance_rescale is None else guidance_rescale

    def generate(captions: list[str], seeds: list[int]) -> list[np.ndarray]:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(
            prompt=captions,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=cfg,
            guidance_rescale=guidance_rescale,
            height=64,
            width=64,
            output_type="np",
        ).images
        return [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]

    return generate


def format_summary(report: dict) -> str:
    rows = []
    for group, s in report["summary"].items():
        attrs = ", ".join(f"{k} {v:.1%}" for k, v in s.items() if k not in ("n",))
        rows.append(f"{group:8s} n={s['n']:3d}  {attrs}")
    return "\n".join(rows)


def contact_sheet(cases: Sequence[EvalCase], images: Sequence[np.ndarray], path: Path, *, columns: int = 10, max_images: int = 100) -> Path:
    """A PNG grid of images, each labelled with its caption (wrapped) and a pass/fail mark."""
    from PIL import Image, ImageDraw, ImageFont

    cases, images = list(cases)[:max_images], list(images)[:max_images]
    cell_w, img_px, text_h = 160, 128, 64
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (img_px + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (case, image) in enumerate(zip(cases, images)):
        x, y = (i % columns) * cell_w, (i // columns) * (img_px + text_h)
        sheet.paste(Image.fromarray(image).resize((img_px, img_px), Image.NEAREST), (x + (cell_w - img_px) // 2, y))
        ok = judge(case.scene, image).adheres
        words, lines, line = case.caption.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 26:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.text((x + 4, y + img_px + 2), ("ok  " if ok else "FAIL ") + "\n".join(lines[:5]), fill=(0, 110, 0) if ok else (180, 0, 0), font=font)
    sheet.save(path)
    return path


def write_report(report: dict, out_dir: Path, cases, images) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    contact_sheet(cases, images, out_dir / "contact_sheet.png")
