"""The "Change images" figures on shapes-world scenes that training never saw (the evaluator's).

    python bench/change_images.py                          # all four, built-in models, 100 scenes each
    nice -n 10 python bench/change_images.py --threads 1 --only upscale restore
    python bench/change_images.py --only upscale restore --n 50
    python bench/change_images.py --model runs/export --upscaler my-x4.safetensors --json report.json

| figure | measured | baseline | goal |
| --- | --- | --- | --- |
| upscale x4 from 64 px | PSNR against the true 256 px render | bicubic | >= 3 dB above |
| restore | PSNR against the clean render | the degraded input | >= 5 dB gain |
| inpaint | the reader finds the prompted new object in the masked box; max change outside the blurred mask | - | >= 85 %, <= 2/255 |
| img2img, strength 0.5 | the reader finds the new background and the old object | - | >= 85 % |

Scenes are the evaluator's (``malerei.world.eval_set``, a fixed seed no training run uses): for
upscale and restore spread over its list (seen, held-out and two-object scenes), for inpaint and
img2img its one-object scenes. The upscale and restore baselines are measured in the same run on
the same scenes, and the report is printed as a Markdown table. Inpainting masks the object's
bounding box plus a margin and prompts another colour and shape at the same place and size;
img2img prompts another background colour. Inpaint and img2img use the text-to-image model at
``malerei/models/shapes`` (the built-in one) unless ``--model`` names another.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"upscale": 3.0, "restore": 5.0, "inpaint": 0.85, "img2img": 0.85}


def one_object_cases(n: int):
    from malerei.world.eval_set import eval_cases

    return [c for c in eval_cases() if len(c.scene.objects) == 1][:n]


def _other(choices, avoid, rng):
    options = [c for c in choices if c not in avoid]
    return options[int(rng.integers(len(options)))]


def bench_upscale(args) -> dict:
    from malerei.engine.upscale import load_upscaler
    from malerei.train.upscaler import evaluate

    model = load_upscaler(args.upscaler, allow_pickle=args.allow_pickle, device=args.device)
    report = evaluate(model, n=args.n)
    x2 = evaluate(model, n=args.n, scale=2)  # --scale 2: the x4 model once, then Lanczos down (no goal)
    return {**report, "upscaler": model.name, "x2": x2, "goal_db": GOALS["upscale"],
            "pass": report["gain_db"] >= GOALS["upscale"]}


def bench_restore(args) -> dict:
    from malerei.restore import load_restorer
    from malerei.train.restorer import evaluate

    model = load_restorer(args.restorer, allow_pickle=args.allow_pickle, device=args.device)
    report = evaluate(model, n=args.n)
    return {**report, "restorer": model.name, "goal_db": GOALS["restore"],
            "pass": report["gain_db"] >= GOALS["restore"]}


def _object_mask(image: np.ndarray, margin: int):
    """The bounding box (plus margin) of every pixel that is not the background, as an L mask."""
    from PIL import Image

    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
    background = np.median(border, axis=0)
    far = np.sqrt(((image.astype(float) - background) ** 2).sum(axis=2)) > 30
    ys, xs = np.nonzero(far)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    h, w = mask.shape
    mask[max(ys.min() - margin, 0):min(ys.max() + margin + 1, h), max(xs.min() - margin, 0):min(xs.max() + margin + 1, w)] = 255
    return Image.fromarray(mask)


def bench_inpaint(args, model) -> dict:
    from PIL import Image

    from malerei.engine import images, img2img
    from malerei.engine.pipeline import GenerationParams
    from malerei.world.read import read_image
    from malerei.world.render import render
    from malerei.world.scene import Scene
    from malerei.world.vocab import COLOURS, SHAPES

    rng = np.random.default_rng(7)
    found, worst_outside = [], 0
    options = img2img.InpaintOptions(strength=args.inpaint_strength, mask_blur=args.mask_blur,
                                      masked_content=args.masked_content)
    for case in one_object_cases(args.n):
        old = case.scene.objects[0]
        new = replace(old, shape=_other(SHAPES, {old.shape}, rng),
                      colour=_other(COLOURS, {old.colour, case.scene.background}, rng))
        target = Scene(background=case.scene.background, objects=(new,))
        source = render(case.scene, 64)
        mask = _object_mask(source, margin=3)
        params = GenerationParams(prompt=target.caption, seed=case.seed, steps=args.steps)
        [result] = img2img.inpaint(model, params, Image.fromarray(source), mask, options=options)
        out = np.asarray(result.image)
        outside = np.asarray(images.blur_mask(mask, options.mask_blur)) == 0
        worst_outside = max(worst_outside, int(np.abs(out.astype(int) - source.astype(int))[outside].max()))
        reading = read_image(out)
        found.append(bool(reading.objects) and reading.objects[0].colour == new.colour
                     and reading.objects[0].shape == new.shape)
    rate = float(np.mean(found))
    return {"found": rate, "scenes": len(found), "model": model.name, "max_change_outside": worst_outside,
            "goal": GOALS["inpaint"],
            "pass": rate >= GOALS["inpaint"] and worst_outside <= 2}


def bench_img2img(args, model) -> dict:
    from PIL import Image

    from malerei.engine import img2img
    from malerei.engine.pipeline import GenerationParams
    from malerei.world.read import read_image
    from malerei.world.render import render
    from malerei.world.vocab import COLOURS

    rng = np.random.default_rng(8)
    new_background, old_object = [], []
    for case in one_object_cases(args.n):
        obj = case.scene.objects[0]
        target = replace(case.scene, background=_other(COLOURS, {obj.colour, case.scene.background}, rng))
        params = GenerationParams(prompt=target.caption, seed=case.seed, steps=args.steps)
        [result] = img2img.img2img(model, params, Image.fromarray(render(case.scene, 64)), strength=0.5)
        reading = read_image(np.asarray(result.image))
        new_background.append(reading.background == target.background)
        old_object.append(bool(reading.objects) and reading.objects[0].colour == obj.colour
                          and reading.objects[0].shape == obj.shape)
    rate = float(np.mean(np.logical_and(new_background, old_object)))
    return {"found": rate, "new_background": float(np.mean(new_background)), "old_object": float(np.mean(old_object)),
            "scenes": len(old_object), "model": model.name, "goal": GOALS["img2img"],
            "pass": rate >= GOALS["img2img"]}


def table(report: dict) -> str:
    """The report as a Markdown table: each figure beside the baseline measured in the same run."""
    verdict = {True: "PASS", False: "FAIL"}
    rows = [("figure", "measured", "baseline (same run)", "gain / rate", "goal", "result")]
    if "upscale" in report:
        r = report["upscale"]
        rows.append((f"upscale x4 from 64 px ({r['upscaler']}), PSNR vs true 256 px", f"{r['psnr']:.2f} dB",
                     f"bicubic {r['psnr_bicubic']:.2f} dB", f"{r['gain_db']:+.2f} dB", f">= +{r['goal_db']:g} dB",
                     verdict[r["pass"]]))
        x2 = r["x2"]
        rows.append(("upscale x2 from 64 px (x4 model, Lanczos down), PSNR vs true 128 px", f"{x2['psnr']:.2f} dB",
                     f"bicubic {x2['psnr_bicubic']:.2f} dB", f"{x2['gain_db']:+.2f} dB", "-", "-"))
    if "restore" in report:
        r = report["restore"]
        rows.append((f"restore ({r['restorer']}), PSNR vs clean 128 px", f"{r['psnr']:.2f} dB",
                     f"degraded input {r['psnr_degraded']:.2f} dB", f"{r['gain_db']:+.2f} dB",
                     f">= +{r['goal_db']:g} dB", verdict[r["pass"]]))
    if "inpaint" in report:
        r = report["inpaint"]
        rows.append((f"inpaint ({r['model']}): new object read back; max change outside the blurred mask",
                     f"{100 * r['found']:.1f} %; {r['max_change_outside']}/255", "-", f"{100 * r['found']:.1f} %",
                     f">= {100 * r['goal']:g} %, <= 2/255", verdict[r["pass"]]))
    if "img2img" in report:
        r = report["img2img"]
        rows.append((f"img2img 0.5 ({r['model']}): new background and old object read back",
                     f"{100 * r['found']:.1f} % (new background {100 * r['new_background']:.0f} %, "
                     f"old object {100 * r['old_object']:.0f} %)", "-", f"{100 * r['found']:.1f} %",
                     f">= {100 * r['goal']:g} %", verdict[r["pass"]]))
    scenes = sorted({r["scenes"] for r in report.values()})
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("---" for _ in rows[0]) + " |")
    return ("\n".join(lines)
            + f"\n\nscenes per figure: {', '.join(map(str, scenes))} (the evaluator's, unseen in training)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(GOALS), default=list(GOALS))
    parser.add_argument("--n", type=int, default=100, help="scenes per figure")
    parser.add_argument("--model", default=None, help="text-to-image model (default: built-in)")
    parser.add_argument("--upscaler", default=None, help="upscaler (default: built-in)")
    parser.add_argument("--restorer", default=None, help="restorer (default: built-in)")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inpaint-strength", type=float, default=1.0)
    parser.add_argument("--mask-blur", type=float, default=2.0)
    parser.add_argument("--masked-content", default="fill")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    report = {}
    if "upscale" in args.only:
        report["upscale"] = bench_upscale(args)
    if "restore" in args.only:
        report["restore"] = bench_restore(args)
    if {"inpaint", "img2img"} & set(args.only):
        from malerei.engine.loading import load_model

        model = load_model(args.model, allow_pickle=args.allow_pickle, device=args.device)
        if "inpaint" in args.only:
            report["inpaint"] = bench_inpaint(args, model)
        if "img2img" in args.only:
            report["img2img"] = bench_img2img(args, model)
    print(table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(row["pass"] for row in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
