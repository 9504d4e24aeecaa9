"""Engine overhead: ``malerei.engine.pipeline.generate`` against the bare diffusers pipeline.

    python bench/engine.py                                   # small random SD1-shaped model, auto device
    python bench/engine.py --preset sd15 --size 512 --steps 20 --repeats 5   # SD 1.5 shapes, random weights
    python bench/engine.py --model my-model --models-dir ~/models              # a real model
    OMP_NUM_THREADS=1 python bench/engine.py --device cpu --size 128 --steps 8 --clock cpu  # shared CPU

Both run the same components (the same module objects, so the same weights, attention
processors and device), the same sampler ("Euler" = EulerDiscreteScheduler), size, steps, cfg,
prompt and seed. Runs alternate (malerei, diffusers, malerei, ...) after a warm-up of each, with
the device synchronised around every call; the table shows per-run times, their medians and the
ratio malerei / diffusers (goal: <= 1.00, i.e. malerei adds nothing), and the largest pixel
difference between the two images (0 or 1 expected). Not part of the tests: run it on demand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # UNet channels, text encoder width/layers, VAE channels: SD 1.x's block layout throughout.
    # "tiny" makes the model's own work negligible, so what is left is the pipelines' overhead.
    "tiny": dict(unet=(32, 64, 128, 128), heads=8, text=(64, 2), vae=(32, 32, 64, 64)),
    "small": dict(unet=(128, 256, 512, 512), heads=8, text=(512, 6), vae=(64, 128, 256, 256)),
    "sd15": dict(unet=(320, 640, 1280, 1280), heads=8, text=(768, 12), vae=(128, 256, 512, 512)),
}


def build_random_sd1(preset: str, device, dtype):
    """A StableDiffusionPipeline with SD1's architecture (scaled by ``preset``), random weights,
    the real CLIP BPE tokenizer and SD1's scheduler config."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from malerei.engine.clip_bpe import build_clip_tokenizer
    from malerei.engine.loading import LoadedModel

    cfg = PRESETS[preset]
    torch.manual_seed(0)
    width, layers = cfg["text"]
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=cfg["unet"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width, attention_head_dim=cfg["heads"],
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg["vae"],
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64, num_hidden_layers=layers,
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              skip_prk_steps=True, set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval()
    return LoadedModel(name=f"random-sd1-{preset}", path=Path(tempfile.gettempdir()), family="sd1",
                       prediction_type="epsilon", pipe=pipe, short_hash="0000000000", file_hashes={},
                       defaults={})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--model", default=None, help="a model name/path instead of a random one "
                                                      "('builtin': malerei's built-in model)")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (steadier on a shared, busy CPU; CPU runs only)")
    args = parser.parse_args(argv)

    from malerei.engine.offline import enforce_offline

    enforce_offline()
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils import logging as diffusers_logging

    from malerei.engine.devices import pick_device, pick_dtype
    from malerei.engine.pipeline import GenerationParams, generate

    diffusers_logging.set_verbosity_error()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.model:
        from malerei.engine.loading import load_model

        model = load_model(None if args.model == "builtin" else args.model, models_dir=args.models_dir,
                           device=args.device, dtype=args.dtype)
    else:
        from malerei.engine.model_dir import BUILTIN_MODEL_DIR, is_diffusers_folder

        if is_diffusers_folder(BUILTIN_MODEL_DIR) and args.preset == "small":
            print("note: the built-in model is installed; pass --model builtin to time it", file=sys.stderr)
        model = build_random_sd1(args.preset, device, dtype)

    prompt, negative = "a red circle on a blue background, photo", "blurry, low quality"
    size, steps = args.size, args.steps
    params = GenerationParams(prompt=prompt, negative_prompt=negative, sampler="Euler", steps=steps,
                              cfg_scale=args.cfg, seed=args.seed, width=size, height=size, batch_size=args.batch)
    reference = type(model.pipe)(**model.pipe.components)
    reference.scheduler = EulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    reference.set_progress_bar_config(disable=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    def run_malerei():
        return [r.image for r in generate(model, params, preview_every=0)]

    def run_diffusers():
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.batch)]
        return reference(prompt, negative_prompt=negative, generator=generators, num_inference_steps=steps,
                         guidance_scale=args.cfg, height=size, width=size, num_images_per_prompt=args.batch,
                         output_type="pil").images

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU runs only")

    def timed(fn):
        sync()
        start = clock()
        out = fn()
        sync()
        return clock() - start, out

    images = {}
    for name, fn in (("malerei", run_malerei), ("diffusers", run_diffusers)):  # warm-up (kernels, caches)
        images[name] = timed(fn)[1]
    times: dict[str, list[float]] = {"malerei": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("malerei", run_malerei), ("diffusers", run_diffusers)):
            times[name].append(timed(fn)[0])

    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
               for a, b in zip(images["malerei"], images["diffusers"], strict=True))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform_cpu()
    print(f"model {model.name}, {device} ({gpu}), {str(dtype).removeprefix('torch.')}, Euler, {steps} steps, "
          f"{size}x{size}, batch {args.batch}, cfg {args.cfg:g}, torch {torch.__version__}, "
          f"{args.clock} clock, {torch.get_num_threads()} CPU threads")
    print(f"{'run':>4} | {'malerei s':>10} | {'diffusers s':>11} | {'ratio':>6}")
    for i, (a, b) in enumerate(zip(times["malerei"], times["diffusers"], strict=True)):
        print(f"{i + 1:>4} | {a:>10.4f} | {b:>11.4f} | {a / b:>6.3f}")
    med_m, med_d = statistics.median(times["malerei"]), statistics.median(times["diffusers"])
    print(f"{'med':>4} | {med_m:>10.4f} | {med_d:>11.4f} | {med_m / med_d:>6.3f}")
    print(f"malerei/diffusers (median): {med_m / med_d:.3f}x; largest pixel difference: {diff}")
    return 0


def platform_cpu() -> str:
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
