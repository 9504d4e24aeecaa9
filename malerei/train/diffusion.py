"""Train the built-in model's text encoder and UNet together on precomputed VAE latents.

    malerei train latents --data runs/data --vae runs/vae --out runs/latents
    malerei train unet --latents runs/latents --run runs/unet --steps 30000

Choices, and why:
- Text encoder: a small CLIPTextModel with a word-level CLIP tokenizer, trained from scratch with
  the UNet. A frozen pretrained encoder would have to come from a PyPI package, and the only one
  at hand (a MiniLM sentence model) is not a CLIP text model, so stock StableDiffusionPipeline
  could not load it; ours is a standard CLIPTextModel + CLIPTokenizer folder.
- v-prediction with zero-terminal-SNR betas and trailing timesteps: at the last step the model
  sees pure noise, so the layout must come from the text, not from leftover signal in the noise.
- Caption dropout (empty caption) so classifier-free guidance works.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DiffusionConfig:
    # UNet: 16x16 latents -> 8x8 -> 4x4. Sized for the CPU speed goals (64 px, 20 steps with CFG:
    # under 0.5 s an image, 0.15 s an image in a batch of 16): about 2 ms a sample a step.
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    # Which levels cross-attend to the text: the coarse ones (8x8, 4x4, and the middle), where a
    # location's features reach the canvas border and so know where they are: the layout is
    # decided there. The 16x16 level only draws edges.
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    # GroupNorm groups: 4 channels a group at the first level. One group a channel (instance norm)
    # would remove each channel's mean over the latent before the output conv, so the UNet could
    # not predict a flat background colour.
    norm_groups: int = 8
    # Heads per block (diffusers' `attention_head_dim` on this UNet is the number of heads):
    # 32 channels a head at every level.
    attention_heads: int | tuple[int, ...] = (1, 2, 4)
    # Text encoder: a CLIPTextModel (causal, 77 positions as Stable Diffusion's). Causal attention
    # lets the last word of an object's phrase gather that object's size, colour and shape, which
    # is what the UNet's cross-attention has to bind to a place.
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_ff: int = 512
    # Timesteps where the text alone decides the layout. With 16x16 latents an object's blob stays
    # detectable in x_t down to SNR ~0.01 (t ~850 here), so under uniform t only ~10 % of samples
    # teach where things go, and position stayed at chance (15 % after 2,000 steps) while colour
    # and size were learned. This share of each batch draws t from [high_noise_min_t, 1000).
    high_noise_fraction: float = 0.5
    high_noise_min_t: int = 850
    high_noise_from_step: int = 0  # a curriculum: uniform t before this step
    # The other end: this share of the other timesteps is drawn from [0, detail_max_t), where a
    # small shape's outline is drawn. img2img from true renders at strength 0.2 (only the last
    # fifth of the schedule) already turned 26 % of v3's small circles square: its low-noise steps
    # are imprecise. (0.35 for 2,000 steps from v3 did not help: model card.)
    detail_fraction: float = 0.0
    detail_max_t: int = 300
    # Extra loss weight on latent cells that hold object pixels (by the evaluator's rule). A small
    # object covers ~9 of 256 latent cells and the cells that tell a triangle from a square or a
    # blob ~2, so under a plain mean its shape is a sliver of the loss: v1 drew every small shape
    # as a blob (small squares 21 %, small triangles 0 %) while colour, size and position were right.
    object_weight: float = 0.0
    # ...and at least this share of each sample's (weighted) loss on its object cells, whatever
    # the object's size (0: off). With a fixed weight a small object still carries ~10 % of its
    # sample's loss against ~35 % for a large one, and v3's misread shapes are nearly all small
    # (small squares 47 %, small circles 65 %, large circles and triangles 100 %).
    object_share: float = 0.0
    # Edit pairs (img2img's case): this share of the samples that may take one (t in edit_t_range,
    # a caption that names its background, not dropped) is noised from the same scene on another
    # background (edits.pt) while the target stays the captioned image. Plain training never shows
    # text and x_t disagreeing, and at t ~500 the background is plain to see in x_t, so a
    # strength-0.5 img2img kept the old background whatever the prompt said (7 %).
    edit_fraction: float = 0.0
    edit_t_range: tuple[int, int] = (200, 800)
    # Noise schedule, as in the shipped scheduler config.
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    # Optimisation.
    batch_size: int = 64
    lr: float = 8e-4
    warmup: int = 300
    steps: int = 12_000
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    eval_every: int = 1000  # 0: never during training
    device: str = "auto"
    time_limit_minutes: float = 0.0  # >0: checkpoint and stop after this long (runs in pieces)
    # Continue training: a diffusion run (its EMA weights) or an exported model folder whose text
    # encoder and UNet start this run (a new optimizer and learning-rate schedule). The model must
    # have this config's architecture and the VAE of this run's latents.
    init_from: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A config read back from config.json has lists where the fields hold tuples.
        for name in ("block_out_channels", "attention_levels", "attention_heads", "edit_t_range"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))


def scheduler_config(config: DiffusionConfig) -> dict:
    """The noise schedule the model is trained with; also the shipped scheduler's config."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": config.prediction_type,
        "rescale_betas_zero_snr": config.rescale_betas_zero_snr,
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def build_text_encoder(config: DiffusionConfig, vocab_size: int, eos_token_id: int, bos_token_id: int, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_hidden,
            intermediate_size=config.text_ff,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            projection_dim=config.text_hidden,
        )
    )


def build_unet(config: DiffusionConfig, latent_channels: int = 4, sample_size: int = 32):
    from diffusers import UNet2DConditionModel

    if len(config.attention_levels) != len(config.block_out_channels):
        raise ValueError("attention_levels needs one entry per block_out_channels entry")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.attention_heads if isinstance(config.attention_heads, int) else tuple(config.attention_heads),
        norm_num_groups=config.norm_groups,
    )


def build_tokenizer(out_dir: Path):
    from malerei.engine.tokenizer_builder import build_word_clip_tokenizer
    from malerei.world.vocab import caption_words

    return build_word_clip_tokenizer(caption_words(), out_dir)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of all images (latents are precomputed once, scaled later)."""
    from malerei.train.vae import to_model_space

    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_space(torch.from_numpy(images[i : i + batch_size])).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


def object_cells(images: np.ndarray, factor: int, *, chunk: int = 4096) -> torch.Tensor:
    """uint8 [N, H/factor, W/factor]: 1 where a latent cell covers any object pixel (SHAPES.md's
    rule: farther than 60 in RGB from the border's median)."""
    from malerei.world.read import background_and_object_pixels

    n, h, w, _ = images.shape
    out = np.empty((n, h // factor, w // factor), dtype=np.uint8)
    for i in range(0, n, chunk):
        _, mask = background_and_object_pixels(images[i : i + chunk])
        out[i : i + chunk] = mask.reshape(len(mask), h // factor, factor, w // factor, factor).any(axis=(2, 4))
    return torch.from_numpy(out)


def prepare_object_cells(data_dir: Path, latents_dir: Path) -> Path:
    """objects.pt beside latents.pt: which latent cells hold object pixels (for `object_weight`)."""
    from malerei.world.shards import read_shards

    images, _ = read_shards(data_dir)
    latent_size = torch.load(latents_dir / "latents.pt", weights_only=True).shape[-1]
    torch.save(object_cells(images, images.shape[1] // latent_size), latents_dir / "objects.pt")
    return latents_dir / "objects.pt"


def prepare_latents(data_dir: Path, vae_run: Path, out_dir: Path) -> Path:
    """Encode every shard image once; writes latents.pt (raw means), captions.json, scale.json,
    and objects.pt (the latent cells that hold object pixels)."""
    from malerei.train.common import pick_train_device
    from malerei.train.vae import load_trained_vae
    from malerei.world.shards import read_shards

    images, captions = read_shards(data_dir)
    vae = load_trained_vae(vae_run).to(pick_train_device(None))
    latents = encode_latents(vae, images)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(latents, out_dir / "latents.pt")
    (out_dir / "captions.json").write_text(json.dumps(captions))
    # Stable Diffusion's scaling_factor: 1 / std of the latents, so the UNet sees unit variance.
    (out_dir / "scale.json").write_text(json.dumps({"scaling_factor": float(1.0 / latents.std())}))
    torch.save(object_cells(images, images.shape[1] // latents.shape[-1]), out_dir / "objects.pt")
    return out_dir


def prepare_edit_latents(data_dir: Path, vae_run: Path, latents_dir: Path, n: int) -> Path:
    """edits.pt beside latents.pt, for `edit_fraction`: the first `n` training scenes rendered again
    on another background and encoded, and whether each caption names its background."""
    from malerei.train.common import pick_train_device
    from malerei.train.vae import load_trained_vae
    from malerei.world.shards import read_shard_scenes, recoloured_backgrounds

    scenes = read_shard_scenes(data_dir, n)
    size = json.loads((Path(data_dir) / "meta.json").read_text())["spec"]["size"]
    images, named = recoloured_backgrounds(scenes, size, seed=len(scenes))
    vae = load_trained_vae(vae_run).to(pick_train_device(None))
    path = latents_dir / "edits.pt"
    torch.save({"latents": encode_latents(vae, images), "named": torch.from_numpy(named)}, path)
    return path


def trained_diffusion_state(path: Path) -> tuple[dict, dict]:
    """(UNet, text encoder) weights of a diffusion run (its EMA) or of an exported model folder."""
    from malerei.train.common import load_checkpoint

    if (path / "checkpoint.pt").exists():
        state = load_checkpoint(path / "checkpoint.pt")
        return state["ema_unet"], state["ema_text"]
    from safetensors.torch import load_file

    unet_file, text_file = path / "unet" / "diffusion_pytorch_model.safetensors", path / "text_encoder" / "model.safetensors"
    if not (unet_file.exists() and text_file.exists()):
        raise FileNotFoundError(f"{path} is neither a diffusion run nor an exported model folder")
    return load_file(unet_file), load_file(text_file)


def _alphas_cumprod(config: DiffusionConfig) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config(config)).alphas_cumprod.float()


def object_loss_weight(cells: torch.Tensor, config: DiffusionConfig) -> torch.Tensor:
    """Per-cell loss weights (n, h, w) from the object cells (n, h, w: 1 where an object is)."""
    per_object = torch.full((len(cells),), 1.0 + config.object_weight, device=cells.device)
    if config.object_share > 0:
        n_obj = cells.flatten(1).sum(1)
        n_bg = cells[0].numel() - n_obj
        ratio = config.object_share / (1 - config.object_share)
        per_object = torch.maximum(per_object, ratio * n_bg / n_obj.clamp(min=1))
    return 1.0 + (per_object[:, None, None] - 1.0) * cells


def sample_timesteps(config: DiffusionConfig, step: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform, with `high_noise_fraction` of them redrawn from the layout range
    and `detail_fraction` of the rest from the low-noise range."""
    t = torch.randint(0, 1000, (n,), generator=g)
    high = torch.zeros(n, dtype=torch.bool)
    if config.high_noise_fraction > 0 and step >= config.high_noise_from_step:
        high = torch.rand(n, generator=g) < config.high_noise_fraction
        t = torch.where(high, torch.randint(config.high_noise_min_t, 1000, (n,), generator=g), t)
    if config.detail_fraction > 0:
        low = ~high & (torch.rand(n, generator=g) < config.detail_fraction)
        t = torch.where(low, torch.randint(0, config.detail_max_t, (n,), generator=g), t)
    return t


def edit_samples(config: DiffusionConfig, edits: dict, idx: torch.Tensor, t: torch.Tensor, captioned: torch.Tensor,
                 g: torch.Generator) -> torch.Tensor:
    """Which samples of a batch are noised from their recoloured twin (bool [n])."""
    n_edits = len(edits["named"])
    low, high = config.edit_t_range
    eligible = (idx < n_edits) & captioned & (t >= low) & (t < high)
    eligible &= edits["named"][idx.clamp(max=n_edits - 1)]
    return eligible & (torch.rand(len(idx), generator=g) < config.edit_fraction)


def train_diffusion(
    config: DiffusionConfig,
    latents_dir: Path,
    run_dir: Path,
    *,
    on_step: Callable[[int, dict], None] | None = None,
    evaluate: Callable[..., dict] | None = None,
) -> Path:
    """Train (or resume) text encoder + UNet in run_dir; returns the checkpoint path."""
    from malerei.train.common import (
        EMA,
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
    tokenizer = build_tokenizer(run_dir / "tokenizer")
    latents = torch.load(latents_dir / "latents.pt", weights_only=True)
    scale = json.loads((latents_dir / "scale.json").read_text())["scaling_factor"]
    captions = json.loads((latents_dir / "captions.json").read_text())
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    objects = None
    if config.object_weight > 0 or config.object_share > 0:
        if not (latents_dir / "objects.pt").exists():
            raise FileNotFoundError(f"{latents_dir / 'objects.pt'} is missing: `malerei train latents --objects-only` writes it")
        objects = torch.load(latents_dir / "objects.pt", weights_only=True)
    edits = None
    if config.edit_fraction > 0:
        if not (latents_dir / "edits.pt").exists():
            raise FileNotFoundError(f"{latents_dir / 'edits.pt'} is missing: `malerei train latents --edits N` writes it")
        edits = torch.load(latents_dir / "edits.pt", weights_only=True)

    torch.manual_seed(config.seed)
    text_encoder = build_text_encoder(
        config, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    ).to(device)
    unet = build_unet(config, latents.shape[1], latents.shape[-1]).to(device)
    if config.init_from:
        unet_state, text_state = trained_diffusion_state(Path(config.init_from))
        unet.load_state_dict(unet_state)
        text_encoder.load_state_dict(text_state)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    ema_unet, ema_text = EMA(unet, config.ema_decay), EMA(text_encoder, config.ema_decay)
    ckpt_path = run_dir / "checkpoint.pt"
    step = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema_unet.shadow, ema_text.shadow = state["ema_unet"], state["ema_text"]
        step = state["step"]
    # Training time so far, carried across resumes: adherence is reported against it.
    seconds_before = float(state.get("seconds", 0.0)) if state is not None else 0.0

    alphas_cumprod = _alphas_cumprod(config).to(device)
    log = LossLog(run_dir / "loss.csv", ["loss", "lr", "samples_per_s"])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t_last, n_last, loss_sum, loss_n = time.time(), 0, 0.0, 0
    unet.train()
    text_encoder.train()
    started, eval_seconds = time.time(), 0.0
    while step < config.steps:
        lr = learning_rate(step, peak=config.lr, warmup=config.warmup, total=config.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(latents), config.batch_size, config.seed, step)
        g = step_generator(config.seed, step)
        x0 = (latents[idx] * scale).to(device)
        input_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < config.caption_dropout
        input_ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = sample_timesteps(config, step, len(idx), g).to(device)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        target = a * noise - s * x0 if config.prediction_type == "v_prediction" else noise
        if edits is not None and (use := edit_samples(config, edits, idx, t.cpu(), ~drop, g).to(device)).any():
            twin = (edits["latents"][idx[use.cpu()]] * scale).to(device)
            xt[use] = a[use] * twin + s[use] * noise[use]
            # the target that leads from this x_t to the captioned x0
            if config.prediction_type == "v_prediction":
                target[use] = (a[use] * xt[use] - x0[use]) / s[use]
            else:
                target[use] = (xt[use] - a[use] * x0[use]) / s[use]
        with autocast:
            context = text_encoder(input_ids.to(device)).last_hidden_state
            pred = unet(xt, t, encoder_hidden_states=context).sample
        if objects is None:
            loss = F.mse_loss(pred.float(), target)
        else:
            weight = object_loss_weight(objects[idx].to(device, torch.float32), config)[:, None]
            loss = (weight * (pred.float() - target) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        step += 1
        n_last += len(idx)
        loss_sum += loss.item()
        loss_n += 1
        if step % config.log_every == 0 or step == config.steps:
            now = time.time()
            stats = {"loss": loss_sum / loss_n, "lr": lr, "samples_per_s": n_last / max(now - t_last, 1e-9)}
            log.write(step, **stats)
            t_last, n_last, loss_sum, loss_n = now, 0, 0.0, 0
            if on_step:
                on_step(step, stats)
        out_of_time = config.time_limit_minutes > 0 and time.time() - started > 60 * config.time_limit_minutes
        if step % config.checkpoint_every == 0 or step == config.steps or out_of_time:
            save_checkpoint(
                ckpt_path,
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "optimizer": opt.state_dict(),
                    "ema_unet": ema_unet.shadow,
                    "ema_text": ema_text.shadow,
                    "step": step,
                    "seconds": seconds_before + time.time() - started - eval_seconds,
                },
            )
        if evaluate and config.eval_every and (step % config.eval_every == 0 or step == config.steps or out_of_time):
            t_eval = time.time()
            evaluate(ema_unet, ema_text, tokenizer, step, (seconds_before + t_eval - started - eval_seconds) / 60)
            eval_seconds += time.time() - t_eval
        if out_of_time:
            break
    log.plot(run_dir / "loss.png")
    return ckpt_path


def periodic_evaluator(config: DiffusionConfig, vae_run: Path, latents_dir: Path, run_dir: Path, *, cases=None):
    """An `evaluate` callback for train_diffusion: the EMA weights, as the stock diffusers pipeline
    they will be shipped as (with its default steps, CFG and guidance rescale), scored by the
    evaluator on a fixed prompt set; one row per call in run_dir/eval.csv (step, training minutes,
    CFG, adherence and attributes per group)."""
    import csv

    from malerei.train.evaluate import diffusers_generate_fn, run_eval
    from malerei.train.export import MODEL_DEFAULTS, assemble_pipeline
    from malerei.train.vae import load_trained_vae
    from malerei.world.eval_set import eval_cases

    cases = cases if cases is not None else eval_cases(seen=60, heldout=20, two=40)
    scale = json.loads((latents_dir / "scale.json").read_text())["scaling_factor"]
    vae = load_trained_vae(vae_run)
    path = run_dir / "eval.csv"

    def evaluate(ema_unet, ema_text, tokenizer, step: int, minutes: float) -> dict:
        text_encoder = build_text_encoder(
            config, len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
        )
        unet = build_unet(config, vae.config.latent_channels, vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1))
        ema_unet.copy_to(unet)
        ema_text.copy_to(text_encoder)
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, config, scale)
        pipe.set_progress_bar_config(disable=True)
        # at the defaults the model ships with, so the curve measures what users get
        report, _ = run_eval(diffusers_generate_fn(pipe), cases, batch_size=40)
        row = {"step": step, "minutes": round(minutes, 2), "cfg": MODEL_DEFAULTS["cfg_scale"]}
        for group, values in report["summary"].items():
            row.update({f"{group}_{k}": round(v, 4) for k, v in values.items() if k != "n"})
        new = not path.exists()
        # a run resumed under a newer version keeps its file's columns (older files have no cfg)
        if new:
            fields = list(row)
        else:
            with path.open(newline="") as f:
                fields = next(csv.reader(f))
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row

    return evaluate
