"""Train the built-in restorer on shapes-world renders degraded with blur, noise, downscaling and JPEG.

    python -m malerei.train.restorer --run runs/restorer --threads 1 --time-limit 14
    python -m malerei.train.restorer --run runs/restorer --export malerei/models/restorer/shapes-restore.safetensors

Each training pair is a clean 128 px render and the same render after :func:`degrade`: a Gaussian
blur, a downscale and upscale back, Gaussian noise and a JPEG round trip, each with a random
amount (the order Real-ESRGAN's first-order degradation uses). The network is a scale-1
SRVGGNetCompact, which spandrel loads as a "Restoration" model, so ``malerei restore`` runs the
exported file like any user model. The loop is the upscaler's (:func:`malerei.train.upscaler.train_loop`).
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from malerei.train.upscaler import build_model, psnr, to_model, train_loop


@dataclass
class RestorerConfig:
    # Sized for a CPU: ~0.1 s a step on one thread, so the default run takes ~13 minutes.
    num_feat: int = 32  # as the upscaler: flat colours, sharp edges
    num_conv: int = 10  # receptive field 25 px: wider than the worst blur + 4x downscale smears an edge
    size: int = 128  # render size of the clean images
    scenes: int = 1024
    variants: int = 2  # degraded versions per scene, drawn once (fresh degradations per step cost CPU)
    crop: int = 40
    batch_size: int = 12
    lr: float = 2e-3  # as the upscaler (small net)
    loss: str = "mse"  # malerei.train.upscaler.LOSSES: what PSNR measures
    warmup: int = 200
    steps: int = 8_000
    ema_decay: float = 0.999
    seed: int = 4321  # never the evaluator's EVAL_SEED
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    time_limit_minutes: float = 0.0


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur (sigma 0..2 px), downscale by 1..4 and back, noise (sigma 0..10 / 255), JPEG (quality 30..90)."""
    from PIL import Image, ImageFilter

    h, w = image.shape[:2]
    picture = Image.fromarray(image)
    sigma = float(rng.uniform(0.0, 2.0))
    if sigma > 0.2:
        picture = picture.filter(ImageFilter.GaussianBlur(sigma))
    factor = float(rng.uniform(1.0, 4.0))
    if factor > 1.1:
        small = (max(8, round(w / factor)), max(8, round(h / factor)))
        picture = picture.resize(small, Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(picture).astype(np.float64)
    pixels += rng.normal(0.0, float(rng.uniform(0.0, 10.0)), pixels.shape)
    picture = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def degraded_set(n: int, seed: int, size: int, variants: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(degraded, clean) uint8 arrays: n scenes x variants degradations each."""
    from malerei.world.render import render
    from malerei.world.scene import sample_scene

    rng = np.random.default_rng(seed)
    bad, good = [], []
    for _ in range(n):
        clean = render(sample_scene(rng, n_objects=int(rng.integers(1, 3)), split="any"), size)
        for _ in range(variants):
            bad.append(degrade(clean, rng))
            good.append(clean)
    return np.stack(bad), np.stack(good)


def train(config: RestorerConfig, run_dir: Path, *, on_step=None) -> Path:
    from malerei.train.common import batch_indices, step_generator
    from malerei.train.upscaler import random_crops

    path = run_dir / "pairs.npz"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        bad, good = degraded_set(config.scenes, config.seed, config.size, config.variants)
        np.savez(path, bad=bad, good=good)
    data = np.load(path)
    bad, good = to_model(data["bad"]), to_model(data["good"])
    torch.manual_seed(config.seed)
    model = build_model(num_feat=config.num_feat, num_conv=config.num_conv, scale=1)

    def make_batch(step: int):
        idx = batch_indices(len(bad), config.batch_size, config.seed, step)
        return random_crops(bad[idx], good[idx], config.crop, 1, step_generator(config.seed, step, 2))

    return train_loop(model, config, run_dir, make_batch, on_step=on_step)


@torch.no_grad()
def evaluate(restorer, *, n: int = 100, size: int = 128, seed: int = 99) -> dict:
    """PSNR of the restored and of the degraded images against the clean render, on the
    evaluator's scenes (:func:`malerei.train.upscaler.unseen_scenes`; degradations drawn from ``seed``)."""
    from PIL import Image

    from malerei.engine.upscale import apply_model
    from malerei.train.upscaler import unseen_scenes
    from malerei.world.render import render

    rng = np.random.default_rng(seed)
    restored_scores, degraded_scores = [], []
    for scene in unseen_scenes(n):
        clean = render(scene, size)
        bad = degrade(clean, rng)
        fixed = np.asarray(apply_model(restorer, Image.fromarray(bad)))
        restored_scores.append(psnr(fixed, clean))
        degraded_scores.append(psnr(bad, clean))
    ours, base = float(np.mean(restored_scores)), float(np.mean(degraded_scores))
    return {"psnr": ours, "psnr_degraded": base, "gain_db": ours - base, "scenes": len(restored_scores)}


def main(argv: list[str] | None = None) -> int:
    from malerei.train.upscaler import export

    parser = argparse.ArgumentParser(prog="python -m malerei.train.restorer", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=RestorerConfig.steps)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-limit", type=float, default=0.0, help="minutes; 0: no limit")
    parser.add_argument("--export", type=Path, default=None, help="write the weights here (.safetensors) and stop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.export is not None:
        path = export(args.run, args.export)
        from malerei.engine.upscale import load_spandrel

        print(evaluate(load_spandrel(path, purposes=("Restoration",), what="restorer"), n=100))
        return 0
    config = RestorerConfig(steps=args.steps, device=args.device, time_limit_minutes=args.time_limit)
    train(config, args.run, on_step=lambda step, stats: print(step, {k: round(v, 4) for k, v in stats.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
