"""The built-in model's card: README.md beside the weights, written from the runs' own records."""

from __future__ import annotations

import json
from pathlib import Path

from malerei.world.vocab import HELD_OUT

ATTRIBUTES = ["adherence", "background", "colour", "shape", "size", "position", "objects"]


def summary_table(summary: dict) -> str:
    header = "| group | n | " + " | ".join(ATTRIBUTES) + " |\n|---|---|" + "---|" * len(ATTRIBUTES) + "\n"
    rows = []
    for group, s in summary.items():
        cells = [f"{s[a]:.1%}" if a in s else "" for a in ATTRIBUTES]
        rows.append(f"| {group} | {s['n']} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows)


def growth_table(eval_csv: Path) -> str:
    """Adherence against training time, from the periodic evaluations (train_diffusion's eval.csv)."""
    import csv

    if not eval_csv.exists():
        return "(no periodic evaluations recorded)"
    rows = list(csv.DictReader(eval_csv.open()))
    cols = ["seen_adherence", "heldout_adherence", "two_adherence", "seen_colour", "seen_shape", "seen_size", "seen_position"]
    header = "| step | minutes | " + " | ".join(c.replace("_", " ") for c in cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
    body = "\n".join(
        f"| {r['step']} | {float(r['minutes']):.0f} | " + " | ".join(f"{float(r[c]):.0%}" if r.get(c) else "" for c in cols) + " |"
        for r in rows
    )
    return header + body


def growth_cfg(eval_csv: Path) -> str:
    """The CFG of the periodic evaluations: runs before v4 recorded none and used 5."""
    import csv

    rows = list(csv.DictReader(eval_csv.open())) if eval_csv.exists() else []
    cfgs = sorted({r["cfg"] for r in rows if r.get("cfg")})
    return f"CFG {', '.join(cfgs)}" if cfgs else "CFG 5"


def floors_from(quick_report: dict, margin: float = 0.1) -> dict:
    """CI floors: a margin below what the shipped weights measured on the quick prompt set (a couple
    of images at its size), so float differences between machines pass and a broken model does not."""
    return {
        group: {k: round(max(0.0, v - margin), 2) for k, v in s.items() if k != "n"}
        for group, s in quick_report["summary"].items()
    }


def write_model_card(*, model_dir: Path, vae_run: Path, unet_run: Path, eval_report: Path, notes: str = "",
                     sheet_name: str = "contact_sheet.png") -> Path:
    vae_cfg = json.loads((vae_run / "config.json").read_text())
    unet_cfg = json.loads((unet_run / "config.json").read_text())
    vae_eval = json.loads((vae_run / "eval.json").read_text()) if (vae_run / "eval.json").exists() else {}
    report = json.loads(eval_report.read_text())
    training = json.loads((model_dir / "training.json").read_text()) if (model_dir / "training.json").exists() else {}
    defaults = json.loads((model_dir / "malerei.json").read_text())
    held_out = ", ".join(f"{c} {s}" for c, s in sorted(HELD_OUT))
    text = f"""# malerei shapes (built-in model)

A small latent diffusion model in the Stable Diffusion architecture (diffusers
`StableDiffusionPipeline`: CLIPTextModel + UNet2DConditionModel + AutoencoderKL), trained by malerei
from nothing on the shapes world (`shared/SHAPES.md`). Stock diffusers loads this folder;
`malerei generate PROMPT` uses it when no `--model` is given.

Prompts follow the shapes-world grammar, e.g. `a large red circle in the center on a blue background`
or `a small yellow square in the top left and a large blue triangle in the bottom right on a black background`.
Defaults (`malerei.json`): {json.dumps(defaults)}.

## Evaluation

`malerei eval` (SHAPES.md's reading rules) over {sum(s['n'] for s in report['summary'].values())} fixed prompts
and seeds; settings {json.dumps(report.get('settings', {}))}:

{summary_table(report['summary'])}

"seen" are colour-shape pairs the training data contains, "heldout" the pairs it never contains
({held_out}), "two" two-object captions (every attribute bound to the right object). The contact
sheet `{sheet_name}` shows the first 100 images with their captions.

VAE round trip on the same renders: {json.dumps(vae_eval)}.

Adherence against training time (the periodic evaluation during training: EMA weights, stock
diffusers pipeline, 60 seen + 20 held-out + 40 two-object prompts, 20 steps, {growth_cfg(unet_run / "eval.csv")}):

{growth_table(unet_run / "eval.csv")}

## Training recipe

Data: shapes-world renders (64 px, half one-object and half two-object scenes, 10 % of captions
with the size, position or background phrase dropped); the held-out pairs never appear.

- VAE: {json.dumps(vae_cfg)}
- Text encoder + UNet: {json.dumps(unet_cfg)}
- Trained: {json.dumps(training)}

Commands: see the top-level README ("The built-in model").

{notes}
"""
    path = model_dir / "README.md"
    path.write_text(text)
    return path
