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
    # Decoder-only fine-tuning: a trained VAE (a run directory or an exported model folder) whose
    # weights start this run, with the encoder frozen. The latent space stays exactly the one the
    # UNet was trained on, so the decoder can go on sharpening (small triangles' apexes) while, or
    # after, the UNet trains.
    decoder_from: str = ""
    # Weight of the reader's-mask loss: the evaluator decides shape from which pixels lie farther
    # than 60 from the background, so an edge drawn half a pixel soft turns a small triangle
    # (fill ~0.55, the threshold 0.64) into a circle while costing almost nothing in MSE. This
    # loss compares that mask, made differentiable, between the original and the reconstruction.
    mask_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    time_limit_minutes: float = 0.0  # >0: checkpoint and stop after this long (runs in pieces)

    def __post_init__(self) -> None:
        # A config read back from config.json has a list here.
        self.block_out_channels = tuple(self.block_out_channels)


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
        vae.load_state_dict(trained_vae_state(Path(config.decoder_from)))
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
        if config.mask_weight > 0:
            loss = loss + config.mask_weight * reader_mask_loss(recon, x)
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


def reader_mask_loss(recon: torch.Tensor, x: torch.Tensor, *, softness: float = 4.0) -> torch.Tensor:
    """Mean squared difference of the evaluator's object masks (SHAPES.md: RGB distance > 60 from
    the median of the outer 3-pixel border), each a sigmoid of (distance - 60) / softness in 0-255
    units. Both masks are taken against the original's background."""
    px_x, px_r = (x + 1) * 127.5, (recon + 1) * 127.5
    border = torch.cat([px_x[..., :3, :].flatten(2), px_x[..., -3:, :].flatten(2),
                        px_x[..., 3:-3, :3].flatten(2), px_x[..., 3:-3, -3:].flatten(2)], dim=2)
    bg = border.median(dim=2).values[..., None, None]

    def soft_mask(px: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((((px - bg) ** 2).sum(1).add(1e-6).sqrt() - 60.0) / softness)

    return F.mse_loss(soft_mask(px_r), soft_mask(px_x))


def _is_run(path: Path) -> bool:
    return (path / "checkpoint.pt").exists()


def _vae_folder(path: Path) -> Path:
    """An exported model folder's VAE (the pipeline folder or its vae/ subfolder)."""
    return path / "vae" if (path / "vae" / "config.json").exists() else path


def vae_config_of(path: Path) -> VAEConfig:
    """The VAEConfig of a trained VAE: a run directory, or an exported diffusers folder."""
    import json

    if _is_run(path):
        return VAEConfig(**json.loads((path / "config.json").read_text()))
    cfg = json.loads((_vae_folder(path) / "config.json").read_text())
    return VAEConfig(
        block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
        norm_groups=cfg["norm_num_groups"], mid_block_attention=cfg.get("mid_block_add_attention", True),
        latent_channels=cfg["latent_channels"],
    )


def trained_vae_state(path: Path) -> dict:
    """The weights of a trained VAE: a run directory's checkpoint, or an exported diffusers folder."""
    from malerei.train.common import load_checkpoint

    if _is_run(path):
        return load_checkpoint(path / "checkpoint.pt")["model"]
    from safetensors.torch import load_file

    return load_file(_vae_folder(path) / "diffusion_pytorch_model.safetensors")


def load_trained_vae(path: Path, config: VAEConfig | None = None):
    """A trained VAE from a run directory or an exported model folder, in eval mode."""
    vae = build_vae(config or vae_config_of(path))
    vae.load_state_dict(trained_vae_state(path))
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
    """Round trip the evaluator's scenes (never used as training data: a fixed eval seed) and read them.

    Besides PSNR and all-six adherence, the shape reading per size and shape of the one-object
    scenes, originals vs round trip: the VAE's misses are nearly all small shapes whose fill ratio
    crosses a threshold, and this says which."""
    from malerei.world.eval_set import eval_cases
    from malerei.world.read import judge
    from malerei.world.render import render

    cases = eval_cases()
    originals = np.stack([render(c.scene, 64) for c in cases])
    recon = roundtrip(vae, originals)
    orig_judged = [judge(c.scene, im) for c, im in zip(cases, originals)]
    recon_judged = [judge(c.scene, im) for c, im in zip(cases, recon)]
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for case, o, r in zip(cases, orig_judged, recon_judged):
        if len(case.scene.objects) == 1:
            obj = case.scene.objects[0]
            by_kind.setdefault(f"{obj.size} {obj.shape}", []).append((o.attributes["shape"], r.attributes["shape"]))
    return {
        "psnr": psnr(originals, recon),
        "adherence_originals": float(np.mean([j.adheres for j in orig_judged])),
        "adherence_roundtrip": float(np.mean([j.adheres for j in recon_judged])),
        "shape_originals_vs_roundtrip": {
            kind: [round(float(np.mean([o for o, _ in v])), 3), round(float(np.mean([r for _, r in v])), 3)]
            for kind, v in sorted(by_kind.items())
        },
    }
