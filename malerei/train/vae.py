"""Train the built-in model's VAE (diffusers AutoencoderKL) on shapes-world renders.

    malerei world render --n 100000 --out runs/data
    malerei train vae --data runs/data --run runs/vae --steps 20000

The VAE is the ceiling of everything after it, so it is judged by what the evaluator reads back:
PSNR of round-tripped held-out renders and the evaluator's adherence on them versus on the originals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels = 4x downsampling: 64 px -> 16x16 latent
    layers_per_block: int = 1
    # GroupNorm groups. Not one group a channel (instance norm): a norm that removes each channel's
    # mean over the image removes flat colour itself, and before the output conv it leaves the
    # decoder unable to say "this background is red" except by drawing patterns whose statistics
    # say so (measured: frames along the border, colour noise in objects, 39 % round-trip reading
    # at step 500). Four channels a group keep colour in the differences within a group.
    norm_groups: int = 4
    mid_block_attention: bool = False  # attention over every latent cell: costly on CPU, little use for flat shapes
    # 8 channels at 16x16: an edge cell must carry two colours and the edge's geometry; with 4 the
    # decoder has to infer them from neighbours, which takes far longer to learn.
    latent_channels: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    steps: int = 20_000
    kl_weight: float = 1e-6  # as Stable Diffusion's VAE: a nearly deterministic autoencoder
    l1_weight: float = 0.5  # L1 keeps flat areas exactly flat and edges sharp; MSE drives PSNR
    # Decode the posterior mean, not a sample: at initialisation the posterior's std is ~1, and
    # sampling drowns the latent in noise until the encoder learns to shrink it, which costs
    # thousands of steps. With a KL weight of 1e-6 the model is a deterministic autoencoder anyway.
    sample_posterior: bool = False
    # Decoder-only fine-tuning: the path of a trained VAE run whose weights start this run, with
    # the encoder frozen. The latent space stays exactly the one the UNet was trained on, so the
    # decoder can go on sharpening (small triangles' apexes) while, or after, the UNet trains.
    decoder_from: str = ""
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    time_limit_minutes: float = 0.0  # >0: checkpoint and stop after this long (runs in pieces)


def build_vae(config: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        mid_block_add_attention=config.mid_block_attention,
        sample_size=64,
    )


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def train_vae(
    config: VAEConfig,
    images: np.ndarray,
    run_dir: Path,
    *,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or resume) a VAE in run_dir; returns the path of the final checkpoint."""
    from malerei.train.common import (
        LossLog,
        batch_indices,
        learning_rate,
        load_checkpoint,
        pick_train_device,
        save_checkpoint,
        save_config,
        step_generator,
    )

    device = pick_train_device(config.device)
    save_config(run_dir, config)
    torch.manual_seed(config.seed)
    vae = build_vae(config).to(device)
    trained = vae.parameters()
    if config.decoder_from:
        vae.load_state_dict(load_checkpoint(Path(config.decoder_from) / "checkpoint.pt")["model"])
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
        trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt_path = run_dir / "checkpoint.pt"
    step = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    data = torch.from_numpy(images)
    log = LossLog(run_dir / "loss.csv", ["loss", "mse", "psnr_batch", "lr", "samples_per_s"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t_last, n_last = time.time(), 0
    vae.train()
    started = time.time()
    while step < config.steps:
        lr = learning_rate(step, peak=config.lr, warmup=config.warmup, total=config.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x = to_model_space(data[batch_indices(len(data), config.batch_size, config.seed, step)]).to(device)
        with autocast, torch.set_grad_enabled(not config.decoder_from):
            posterior = vae.encode(x).latent_dist
        with autocast:
            z = posterior.mean
            if config.sample_posterior:
                eps = torch.randn(z.shape, generator=step_generator(config.seed, step), dtype=torch.float32).to(device)
                z = z + posterior.std * eps
            recon = vae.decode(z).sample
        recon = recon.float()
        mse = F.mse_loss(recon, x)
        loss = mse + config.l1_weight * F.l1_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        n_last += len(x)
        if step % config.log_every == 0 or step == config.steps:
            now = time.time()
            stats = {
                "loss": loss.item(),
                "mse": mse.item(),
                # images span 2.0 in model space, so PSNR = 10 log10(2^2 / mse)
                "psnr_batch": 10 * np.log10(4.0 / max(mse.item(), 1e-12)),
                "lr": lr,
                "samples_per_s": n_last / max(now - t_last, 1e-9),
            }
            log.write(step, **stats)
            t_last, n_last = now, 0
            if on_step:
                on_step(step, stats)
        out_of_time = config.time_limit_minutes > 0 and time.time() - started > 60 * config.time_limit_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            save_checkpoint(ckpt_path, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step})
        if out_of_time:
            break
    log.plot(run_dir / "loss.png")
    return ckpt_path


def load_trained_vae(run_dir: Path, config: VAEConfig | None = None):
    from malerei.train.common import load_checkpoint

    import json

    if config is None:
        raw = json.loads((run_dir / "config.json").read_text())
        raw["block_out_channels"] = tuple(raw["block_out_channels"])
        config = VAEConfig(**raw)
    vae = build_vae(config)
    vae.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt")["model"])
    return vae.eval()


@torch.no_grad()
def roundtrip(vae, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_space(torch.from_numpy(images[i : i + batch_size])).to(device)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def evaluate_vae(vae) -> dict:
    """Round trip the evaluator's scenes (never used as training data: a fixed eval seed) and read them."""
    from malerei.world.eval_set import eval_cases
    from malerei.world.read import judge
    from malerei.world.render import render

    cases = eval_cases()
    originals = np.stack([render(c.scene, 64) for c in cases])
    recon = roundtrip(vae, originals)
    orig_ok = np.mean([judge(c.scene, im).adheres for c, im in zip(cases, originals)])
    recon_ok = np.mean([judge(c.scene, im).adheres for c, im in zip(cases, recon)])
    return {
        "psnr": psnr(originals, recon),
        "adherence_originals": float(orig_ok),
        "adherence_roundtrip": float(recon_ok),
    }
