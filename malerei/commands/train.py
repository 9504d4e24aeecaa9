"""`malerei train {vae,latents,unet,export}`: the built-in model's recipe, one step per command.

Every step resumes from its run directory, so a stopped run continues where it left off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the built-in model (VAE, text encoder + UNet) on shapes-world data")
    tsub = p.add_subparsers(dest="train_command", metavar="STEP", required=True)

    a = tsub.add_parser("all", help="the whole recipe (render, VAE, latents, text encoder + UNet, export) in a time budget")
    a.add_argument("--runs", type=Path, required=True, help="run directories (outside the repo)")
    a.add_argument("--out", type=Path, required=True, help="where the diffusers folder is written")
    a.add_argument("--images", type=int, default=120_000, help="renders to train on")
    a.add_argument("--vae-minutes", type=float, default=35.0)
    a.add_argument("--unet-minutes", type=float, default=100.0)
    a.add_argument("--decoder-minutes", type=float, default=0.0, help="decoder fine-tuning after the UNet (0: none)")
    a.add_argument("--device", default="auto")
    a.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    a.set_defaults(func=run_all)

    v = tsub.add_parser("vae", help="train the VAE on rendered shards")
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--run", type=Path, required=True)
    v.add_argument("--steps", type=int)
    v.add_argument("--batch-size", type=int)
    v.add_argument("--device")
    v.add_argument("--minutes", type=float, help="stop (checkpointed) after this long; run again to resume")
    v.set_defaults(func=run_vae)

    d = tsub.add_parser("decoder", help="fine-tune a trained VAE's decoder with its encoder frozen (same latents)")
    d.add_argument("--vae", type=Path, required=True,
                   help="the trained VAE whose latents the UNet uses: a VAE run, or an exported model folder")
    d.add_argument("--data", type=Path, required=True)
    d.add_argument("--run", type=Path, required=True)
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--lr", type=float, default=3e-4)
    d.add_argument("--mask-weight", type=float, default=0.0,
                   help="weight of the loss on the evaluator's object mask (sharp small shapes)")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--device")
    d.add_argument("--minutes", type=float, help="stop (checkpointed) after this long; run again to resume")
    d.set_defaults(func=run_decoder)

    lat = tsub.add_parser("latents", help="encode all shards once with the trained VAE")
    lat.add_argument("--data", type=Path, required=True)
    lat.add_argument("--vae", type=Path, required=True)
    lat.add_argument("--out", type=Path, required=True)
    lat.add_argument("--objects-only", action="store_true",
                     help="only write objects.pt (the latent cells that hold objects) beside existing latents")
    lat.add_argument("--edits", type=int, metavar="N",
                     help="only write edits.pt beside existing latents: the first N scenes on another background "
                          "(for `train unet --edit-fraction`)")
    lat.set_defaults(func=run_latents)

    u = tsub.add_parser("unet", help="train text encoder + UNet on precomputed latents")
    u.add_argument("--latents", type=Path, required=True)
    u.add_argument("--run", type=Path, required=True)
    u.add_argument("--steps", type=int)
    u.add_argument("--batch-size", type=int)
    u.add_argument("--lr", type=float)
    u.add_argument("--warmup", type=int, help="learning-rate warmup steps")
    u.add_argument("--seed", type=int, help="seed of the batch order, noise and timesteps")
    u.add_argument("--device")
    u.add_argument("--minutes", type=float, help="stop (checkpointed) after this long; run again to resume")
    u.add_argument("--vae", type=Path, help="the VAE run: evaluate the EMA weights every --eval-every steps (eval.csv)")
    u.add_argument("--eval-every", type=int)
    u.add_argument("--high-noise-fraction", type=float, help="share of timesteps drawn from the layout range (default 0.5)")
    u.add_argument("--high-noise-from-step", type=int, help="uniform timesteps before this step (a curriculum)")
    u.add_argument("--detail-fraction", type=float,
                   help="share of the other timesteps drawn from the low-noise range (small shapes' outlines)")
    u.add_argument("--object-weight", type=float,
                   help="extra loss weight on latent cells that hold objects (0: a plain mean)")
    u.add_argument("--object-share", type=float,
                   help="at least this share of each sample's loss on its object cells, whatever the "
                        "object's size (0: off)")
    u.add_argument("--edit-fraction", type=float,
                   help="share of eligible samples noised from the scene on another background (edits.pt): "
                        "img2img follows a changed prompt")
    u.add_argument("--init-from", type=Path,
                   help="continue training this model: a diffusion run or an exported model folder (same VAE)")
    u.add_argument("--threads", type=int, help="torch CPU threads")
    u.set_defaults(func=run_unet)

    c = tsub.add_parser("card", help="write the exported model's card, CI floors and pictures from the runs' records")
    c.add_argument("--model", type=Path, required=True, help="the exported diffusers folder")
    c.add_argument("--vae", type=Path, required=True, help="the VAE (or decoder) run that was exported")
    c.add_argument("--unet", type=Path, required=True)
    c.add_argument("--eval", type=Path, required=True, help="`malerei eval` output (full prompt list) of the exported model")
    c.add_argument("--quick", type=Path, required=True, help="`malerei eval --quick` output: the CI floors come from it")
    c.add_argument("--notes", type=Path, help="a Markdown file appended to the card (status, limits)")
    c.set_defaults(func=run_card)

    e = tsub.add_parser("export", help="write the diffusers StableDiffusionPipeline folder")
    e.add_argument("--vae", type=Path, required=True)
    e.add_argument("--latents", type=Path, required=True)
    e.add_argument("--unet", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=run_export)


def _config(cls, run: Path, args: argparse.Namespace, names: dict[str, str]):
    """A run's config: the saved one when resuming, else defaults; CLI flags override either."""
    saved = run / "config.json"
    values = json.loads(saved.read_text()) if saved.exists() else {}
    for flag, field in names.items():
        if getattr(args, flag, None) is not None:
            values[field] = getattr(args, flag)
    return cls(**values)


def _progress(total: int, start: int, label: str, fields: list[str]):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn()
    )
    task = bar.add_task(label, total=total, completed=start, stats="")

    def on_step(step: int, stats: dict) -> None:
        bar.update(task, completed=step, stats="  ".join(f"{k} {stats[k]:.4g}" for k in fields if k in stats))

    return bar, on_step


def run_all(args: argparse.Namespace) -> int:
    import sys

    import torch

    from malerei.engine.errors import InvalidParameter
    from malerei.train.recipe import RecipeConfig, run_recipe

    if args.images < 100 or args.vae_minutes <= 0 or args.unet_minutes <= 0 or args.decoder_minutes < 0:
        raise InvalidParameter("--images must be at least 100, the VAE and UNet minutes positive, the decoder's not negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RecipeConfig(runs=args.runs, out=args.out, n_images=args.images, vae_minutes=args.vae_minutes,
                          unet_minutes=args.unet_minutes, decoder_minutes=args.decoder_minutes, device=args.device)
    def on_step(stage: str, step: int, stats: dict) -> None:
        line = "  ".join(f"{k} {v:.4g}" for k, v in stats.items())
        print(f"{stage} step {step}: {line}", file=sys.stderr, flush=True)

    run_recipe(config, log=lambda m: print(m, file=sys.stderr, flush=True), on_step=on_step)
    print(args.out)
    return 0


def run_vae(args: argparse.Namespace) -> int:
    from malerei.train.vae import VAEConfig

    config = _config(VAEConfig, args.run, args, {"steps": "steps", "batch_size": "batch_size", "device": "device", "minutes": "time_limit_minutes"}
    )
    return _train_and_evaluate_vae(config, args.data, args.run, "vae")


def _train_and_evaluate_vae(config, data: Path, run: Path, label: str) -> int:
    from malerei.train.vae import evaluate_vae, load_trained_vae, train_vae
    from malerei.world.shards import read_shards

    images, _ = read_shards(data)
    bar, on_step = _progress(config.steps, 0, label, ["loss", "psnr_batch", "samples_per_s"])
    with bar:
        train_vae(config, images, run, on_step=on_step)
    metrics = evaluate_vae(load_trained_vae(run))
    (run / "eval.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


def run_decoder(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from malerei.engine.errors import InvalidParameter
    from malerei.train.vae import VAEConfig, vae_config_of

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if (args.run / "config.json").exists():
        config = _config(VAEConfig, args.run, args, {"device": "device", "minutes": "time_limit_minutes"})
    else:
        if not (args.vae / "checkpoint.pt").exists() and not any(
            (folder / "config.json").exists() for folder in (args.vae, args.vae / "vae")
        ):
            raise InvalidParameter(f"{args.vae} is neither a VAE run nor an exported model folder")
        if args.mask_weight < 0:
            raise InvalidParameter("--mask-weight must not be negative")
        base = vae_config_of(args.vae)
        # Another batch seed: the base run has seen its first epoch's order already.
        config = replace(base, decoder_from=str(args.vae), steps=args.steps, lr=args.lr, warmup=50, seed=base.seed + 1,
                         mask_weight=args.mask_weight, time_limit_minutes=args.minutes or 0.0,
                         device=args.device or base.device)
    return _train_and_evaluate_vae(config, args.data, args.run, "decoder")


def run_latents(args: argparse.Namespace) -> int:
    from malerei.engine.errors import InvalidParameter
    from malerei.train.diffusion import prepare_edit_latents, prepare_latents, prepare_object_cells

    if args.objects_only or args.edits is not None:
        if not (args.out / "latents.pt").exists():
            raise InvalidParameter(f"--objects-only and --edits need latents in {args.out}; run without them first")
        if args.edits is not None and args.edits < 1:
            raise InvalidParameter("--edits must be at least 1")
        if args.objects_only:
            print(prepare_object_cells(args.data, args.out))
        if args.edits is not None:
            print(prepare_edit_latents(args.data, args.vae, args.out, args.edits))
        return 0
    print(prepare_latents(args.data, args.vae, args.out))
    return 0


def run_unet(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from malerei.train.diffusion import DiffusionConfig, periodic_evaluator, train_diffusion

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = _config(
        DiffusionConfig, args.run, args,
        {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "warmup": "warmup", "seed": "seed", "device": "device",
         "minutes": "time_limit_minutes",
         "eval_every": "eval_every", "high_noise_fraction": "high_noise_fraction",
         "high_noise_from_step": "high_noise_from_step", "object_weight": "object_weight",
         "object_share": "object_share", "edit_fraction": "edit_fraction", "detail_fraction": "detail_fraction"},
    )
    from malerei.engine.errors import InvalidParameter

    if args.init_from is not None and not (args.run / "config.json").exists():
        source = args.init_from
        if not ((source / "checkpoint.pt").exists() or (source / "unet" / "config.json").exists()):
            raise InvalidParameter(f"--init-from {source} is neither a diffusion run nor an exported model folder")
        config = replace(config, init_from=str(source))

    if (not 0.0 <= config.high_noise_fraction <= 1.0 or config.high_noise_from_step < 0 or config.object_weight < 0
            or not 0.0 <= config.edit_fraction <= 1.0 or not 0.0 <= config.object_share < 1.0
            or not 0.0 <= config.detail_fraction <= 1.0):
        raise InvalidParameter("--high-noise-fraction, --detail-fraction and --edit-fraction must be within [0, 1], "
                               "--object-share in [0, 1), "
                               "--high-noise-from-step and --object-weight not negative")
    evaluate = periodic_evaluator(config, args.vae, args.latents, args.run) if args.vae else None
    bar, on_step = _progress(config.steps, 0, "unet", ["loss", "samples_per_s"])
    with bar:
        train_diffusion(config, args.latents, args.run, on_step=on_step, evaluate=evaluate)
    print(args.run / "checkpoint.pt")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from malerei.train.export import build_pipeline, export_pipeline

    pipe, info = build_pipeline(args.vae, args.latents, args.unet)
    print(export_pipeline(pipe, args.out, training={"unet_steps": info["steps"]}))
    return 0


def run_card(args: argparse.Namespace) -> int:
    import shutil

    from malerei.engine.errors import InvalidParameter
    from malerei.train.model_card import floors_from, write_model_card

    for path in (args.eval / "report.json", args.quick / "report.json", args.model / "model_index.json"):
        if not path.exists():
            raise InvalidParameter(f"{path} does not exist")
    quick = json.loads((args.quick / "report.json").read_text())
    (args.model / "floors.json").write_text(json.dumps(floors_from(quick), indent=2) + "\n")
    shutil.copyfile(args.eval / "contact_sheet.png", args.model / "contact_sheet.png")
    for name, run in (("vae_loss.png", args.vae), ("unet_loss.png", args.unet)):
        if (run / "loss.png").exists():
            shutil.copyfile(run / "loss.png", args.model / name)
    notes = args.notes.read_text() if args.notes else ""
    print(write_model_card(model_dir=args.model, vae_run=args.vae, unet_run=args.unet, eval_report=args.eval / "report.json",
                           notes=notes))
    return 0
