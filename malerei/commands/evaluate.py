"""`malerei eval`: generate the evaluator's fixed prompt list with a model and read it back."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model's prompt adherence on the shapes world (SHAPES.md rules)")
    p.add_argument("--model", help="model name or path (default: the built-in model)")
    p.add_argument("--models-dir", type=Path)
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", help="A1111 sampler name (default: the model's)")
    p.add_argument("--scheduler", default=None, help="A1111 schedule type (default: the model's)")
    p.add_argument("--cfg", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=25, help="prompts per UNet batch")
    p.add_argument("--quick", action="store_true", help="the small prompt set used during training and in CI")
    p.add_argument("--renders", action="store_true", help="score the renderer's own images (the reader's ceiling)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="auto, fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on cpu)")
    p.add_argument("--out", type=Path, required=True, help="directory for report.json and contact_sheet.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from malerei.engine.errors import InvalidParameter
    from malerei.train.evaluate import run_eval, write_report
    from malerei.world.eval_set import eval_cases, small_eval_cases
    from malerei.world.render import render

    if args.batch_size < 1:
        raise InvalidParameter("--batch-size must be at least 1")
    cases = small_eval_cases() if args.quick else eval_cases()
    if args.renders:
        def generate(captions, seeds, _cases=iter(cases)):
            return [render(next(_cases).scene) for _ in captions]
    else:
        generate = model_generate_fn(args)
    err = Console(stderr=True)
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("eval", total=len(cases))
        report, images = run_eval(generate, cases, batch_size=args.batch_size, progress=lambda k: bar.advance(task, k))
    report["settings"] = {k: getattr(args, k) for k in ("model", "steps", "sampler", "scheduler", "cfg", "quick", "renders")}
    write_report(report, args.out, cases, images)
    table = Table(title="prompt adherence (SHAPES.md reading rules)")
    table.add_column("group")
    table.add_column("n", justify="right")
    names = ["adherence", "background", "colour", "shape", "size", "position", "objects"]
    for name in names:
        table.add_column(name, justify="right")
    for group, s in report["summary"].items():
        table.add_row(group, str(s["n"]), *(f"{s[n]:.1%}" if n in s else "" for n in names))
    Console().print(table)
    print(args.out / "report.json")
    return 0


def model_generate_fn(args: argparse.Namespace):
    import numpy as np

    from malerei.engine.batch import generate_many
    from malerei.engine.loading import load_model
    from malerei.engine.pipeline import GenerationParams

    model = load_model(args.model, models_dir=args.models_dir, device=args.device, dtype=args.dtype)

    def generate(captions: list[str], seeds: list[int]) -> list[np.ndarray]:
        params = [
            GenerationParams(prompt=c, seed=s, sampler=args.sampler, scheduler=args.scheduler, steps=args.steps, cfg_scale=args.cfg)
            for c, s in zip(captions, seeds)
        ]
        return [np.asarray(result[0].image.convert("RGB")) for result in generate_many(model, params, preview_every=0)]

    return generate
