"""Train the built-in x4 upscaler on shapes-world pairs: the same scene rendered at 64 and 256 px.

    python -m malerei.train.upscaler --run runs/upscaler --threads 1 --time-limit 14
    python -m malerei.train.upscaler --run runs/upscaler --export malerei/models/upscaler/shapes-x4.safetensors

(the first command stops after 14 minutes with a checkpoint; the same command again resumes.)

The renderer draws a scene at any canvas size exactly, so a (64 px, 256 px) pair is a perfect
low/high-resolution pair with no degradation model to guess. The network is Real-ESRGAN's
SRVGGNetCompact ("Compact" in spandrel): small, fast, and its exported file is an ordinary
upscaler that ``malerei upscale`` loads through spandrel like any user model.

Scenes come from their own seed (``UpscalerConfig.seed``); the evaluator's scenes
(``malerei.world.eval_set``, ``EVAL_SEED``) are never trained on and are what
:func:`evaluate` and ``bench/change_images.py`` measure on. Training is resumable: batches are
pure functions of (seed, step) and checkpoints hold weights, optimizer, EMA and step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class UpscalerConfig:
    # Sized for a CPU: ~0.08 s a step on one thread, so the default run takes ~11 minutes.
    num_feat: int = 32  # Compact's width: shapes are flat colours, edges are all there is to learn
    num_conv: int = 8  # depth = receptive field (17 px at 64): an edge and its anti-aliased neighbours
    scale: int = 4  # 64 -> 256, the renderer's largest exact pair
    scenes: int = 1024  # pairs rendered once into the run folder (256 px: ~200 MB)
    crop: int = 32  # low-resolution crop side; the high-resolution crop is crop * scale
    batch_size: int = 16
    lr: float = 2e-3  # a small net: 2e-3 learned twice as fast as 5e-4 in an 800-step pilot
    loss: str = "mse"  # see LOSSES
    warmup: int = 200
    steps: int = 8_000
    ema_decay: float = 0.999
    seed: int = 1234  # scene and batch seed; never the evaluator's EVAL_SEED
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    time_limit_minutes: float = 0.0  # >0: checkpoint and stop after this long (runs in pieces)


def build_model(*, num_feat: int, num_conv: int, scale: int):
    """SRVGGNetCompact (spandrel's class, so the saved keys are Real-ESRGAN's)."""
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale, act_type="prelu")


def render_pairs(n: int, seed: int, sizes: tuple[int, int] = (64, 256)) -> tuple[np.ndarray, np.ndarray]:
    """n random scenes (one or two objects, every colour-shape pair) at two canvas sizes."""
    from malerei.world.render import render
    from malerei.world.scene import sample_scene

    rng = np.random.default_rng(seed)
    low, high = [], []
    for _ in range(n):
        scene = sample_scene(rng, n_objects=int(rng.integers(1, 3)), split="any")
        low.append(render(scene, sizes[0]))
        high.append(render(scene, sizes[1]))
    return np.stack(low), np.stack(high)


def to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] (spandrel's range)."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(255.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def random_crops(low: torch.Tensor, high: torch.Tensor, crop: int, scale: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: low [B, 3, crop, crop] and high [B, 3, crop * scale, crop * scale]."""
    n, _, h, w = low.shape
    ys = torch.randint(0, h - crop + 1, (n,), generator=generator)
    xs = torch.randint(0, w - crop + 1, (n,), generator=generator)
    lo = torch.stack([low[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    hi = torch.stack([high[i, :, y * scale:(y + crop) * scale, x * scale:(x + crop) * scale]
                      for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    return lo, hi


# Mean squared error is what PSNR measures. L1 failed here: shapes-world residuals are zero almost
# everywhere, and L1's constant push on those pixels drove the small net's output to exactly zero
# (the 8000-step L1 run ended as nearest-neighbour upscaling, 2 dB below bicubic).
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


def train_loop(model: torch.nn.Module, config, run_dir: Path, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               *, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """The shared loop of the upscaler and the restorer: ``config.loss`` on (input, target) batches, AdamW,
    warmup + cosine LR, EMA, resumable checkpoints, loss CSV. Returns the checkpoint path."""
    from malerei.train.common import (
        EMA,
        LossLog,
        learning_rate,
        load_checkpoint,
        pick_train_device,
        save_checkpoint,
        save_config,
    )

    device = pick_train_device(config.device)
    save_config(run_dir, config)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(model, config.ema_decay)
    ckpt = run_dir / "checkpoint.pt"
    step = 0
    if (state := load_checkpoint(ckpt)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        step = state["step"]
    log = LossLog(run_dir / "loss.csv", ["loss", "psnr_batch", "lr", "samples_per_s"])
    started = t_last = time.time()
    n_last = 0
    model.train()
    while step < config.steps:
        lr = learning_rate(step, peak=config.lr, warmup=config.warmup, total=config.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = make_batch(step)
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = LOSSES[config.loss](out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        step += 1
        n_last += len(x)
        if step % config.log_every == 0 or step == config.steps:
            now = time.time()
            mse = F.mse_loss(out.detach().clamp(0, 1), y).item()
            stats = {"loss": loss.item(), "psnr_batch": 10 * np.log10(1.0 / max(mse, 1e-12)), "lr": lr,
                     "samples_per_s": n_last / max(now - t_last, 1e-9)}
            log.write(step, **stats)
            t_last, n_last = now, 0
            if on_step:
                on_step(step, stats)
        out_of_time = config.time_limit_minutes > 0 and time.time() - started > 60 * config.time_limit_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "ema": ema.shadow, "step": step})
        if out_of_time:
            break
    return ckpt


def load_data(config: UpscalerConfig, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pairs, rendered once into run_dir/pairs.npz (data preparation, then reading)."""
    path = run_dir / "pairs.npz"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        low, high = render_pairs(config.scenes, config.seed, (64, 64 * config.scale))
        np.savez(path, low=low, high=high)
    data = np.load(path)
    return to_model(data["low"]), to_model(data["high"])


def train(config: UpscalerConfig, run_dir: Path, *, on_step=None) -> Path:
    from malerei.train.common import batch_indices, step_generator

    low, high = load_data(config, run_dir)
    torch.manual_seed(config.seed)
    model = build_model(num_feat=config.num_feat, num_conv=config.num_conv, scale=config.scale)

    def make_batch(step: int):
        idx = batch_indices(len(low), config.batch_size, config.seed, step)
        return random_crops(low[idx], high[idx], config.crop, config.scale, step_generator(config.seed, step, 2))

    return train_loop(model, config, run_dir, make_batch, on_step=on_step)


def export(run_dir: Path, out: Path, *, use_ema: bool = True) -> Path:
    """The trained weights as a .safetensors upscaler file (Real-ESRGAN Compact keys)."""
    from safetensors.torch import save_file

    from malerei.train.common import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoint.pt")
    weights = state["ema"] if use_ema else state["model"]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(out),
              metadata={"malerei": "shapes-world upscaler", "step": str(state["step"])})
    return out


def unseen_scenes(n: int) -> list:
    """``n`` of the evaluator's scenes (``EVAL_SEED``: no training run draws them), spread evenly over its
    list so seen pairs, held-out pairs and two-object scenes all take part."""
    from malerei.world.eval_set import eval_cases

    cases = eval_cases()
    if not 1 <= n <= len(cases):
        raise ValueError(f"n must be 1..{len(cases)}, got {n}")
    return [c.scene for c in cases[:: len(cases) // n][:n]]


@torch.no_grad()
def evaluate(upscaler, *, n: int = 100, scale: int = 4) -> dict:
    """PSNR of the upscaler and of bicubic against the true render at ``64 * scale`` px, from the 64 px
    render of the evaluator's scenes (:func:`unseen_scenes`). ``scale`` 2 with an x4 model runs it once
    and resizes down (what ``malerei upscale --scale 2`` does)."""
    from PIL import Image

    from malerei.engine.upscale import upscale_image
    from malerei.world.render import render

    model_scores, bicubic_scores = [], []
    for scene in unseen_scenes(n):
        low, truth = render(scene, 64), render(scene, 64 * scale)
        ours = np.asarray(upscale_image(upscaler, Image.fromarray(low), scale))
        bicubic = np.asarray(Image.fromarray(low).resize(truth.shape[1::-1], Image.Resampling.BICUBIC))
        model_scores.append(psnr(ours, truth))
        bicubic_scores.append(psnr(bicubic, truth))
    ours, base = float(np.mean(model_scores)), float(np.mean(bicubic_scores))
    return {"psnr": ours, "psnr_bicubic": base, "gain_db": ours - base, "scenes": len(model_scores),
            "scale": scale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m malerei.train.upscaler", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (data, checkpoint, loss log)")
    parser.add_argument("--steps", type=int, default=UpscalerConfig.steps)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-limit", type=float, default=0.0, help="minutes; 0: no limit")
    parser.add_argument("--export", type=Path, default=None, help="write the weights here (.safetensors) and stop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.export is not None:
        path = export(args.run, args.export)
        from malerei.engine.upscale import load_upscaler

        model = load_upscaler(path)
        print(evaluate(model, n=100), evaluate(model, n=100, scale=2))
        return 0
    config = UpscalerConfig(steps=args.steps, device=args.device, time_limit_minutes=args.time_limit)
    train(config, args.run, on_step=lambda step, stats: print(step, {k: round(v, 4) for k, v in stats.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
