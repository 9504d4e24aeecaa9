"""Assemble trained parts into a standard diffusers StableDiffusionPipeline folder (safetensors).

Stock diffusers loads the result with no malerei code; `malerei.json` beside it carries the
defaults malerei uses for this model (sampler, steps, CFG, size, guidance rescale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# CFG 2.5 was chosen on a selection prompt set apart from the evaluator's (model card): at 5, CFG
# pushes a small square's corners out into a four-pointed star.
MODEL_DEFAULTS = {
    "sampler": "Euler",
    "scheduler": "Automatic",
    "steps": 20,
    "cfg_scale": 2.5,
    "guidance_rescale": 0.7,
    "width": 64,
    "height": 64,
}


def build_pipeline(vae_run: Path, latents_dir: Path, diffusion_run: Path, *, use_ema: bool = True):
    from transformers import CLIPTokenizer

    from malerei.train.common import load_checkpoint
    from malerei.train.diffusion import DiffusionConfig, build_text_encoder, build_unet
    from malerei.train.vae import load_trained_vae

    config = DiffusionConfig(**json.loads((diffusion_run / "config.json").read_text()))
    tokenizer = CLIPTokenizer.from_pretrained(str(diffusion_run / "tokenizer"), local_files_only=True)
    state = load_checkpoint(diffusion_run / "checkpoint.pt")
    text_encoder = build_text_encoder(
        config, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    )
    vae = load_trained_vae(vae_run)
    unet = build_unet(config, vae.config.latent_channels, 64 // 2 ** (len(vae.config.block_out_channels) - 1))
    unet.load_state_dict(state["ema_unet"] if use_ema else state["unet"])
    text_encoder.load_state_dict(state["ema_text"] if use_ema else state["text_encoder"])
    scale = json.loads((latents_dir / "scale.json").read_text())["scaling_factor"]
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, config, scale), {"steps": state["step"]}


def assemble_pipeline(vae, text_encoder, tokenizer, unet, config, scaling_factor: float):
    """A stock StableDiffusionPipeline from trained parts, with the training noise schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from malerei.train.diffusion import scheduler_config

    vae.register_to_config(scaling_factor=scaling_factor)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config(config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(pipe, out_dir: Path, *, training: dict | None = None) -> Path:
    """Save as a diffusers folder in float32 safetensors.

    Not float16, though it would halve the size: transformers 5 loads a text encoder in the dtype
    it was saved in while diffusers loads the UNet in float32, so a stock
    ``StableDiffusionPipeline.from_pretrained(folder)`` of a float16 folder fails on mixed dtypes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.to(dtype=torch.float32)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "malerei.json").write_text(json.dumps(MODEL_DEFAULTS, indent=2) + "\n")
    if training:
        (out_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out_dir
