"""``malerei img2img``, ``malerei inpaint``, ``malerei outpaint``: change an image with a prompt.

    malerei img2img photo.png "a red circle on a blue background" --strength 0.5
    malerei inpaint photo.png --mask mask.png "a green square" --mask-blur 4 --only-masked
    malerei inpaint cutout.png "a green square"               # mask: the transparent pixels
    malerei outpaint photo.png "a red circle" --left 32 --right 32

They take ``generate``'s options where they apply and keep its contract: each written PNG's path
on its own line on stdout (nothing else), progress on stderr, and every mistake a user can make
(unreadable or unsupported image, mask of another size, strength out of range, ...) one
``error: ...`` line with exit status 2.

Also here, for ``generate``: the hires fix options (:func:`add_hires_options`) and
:func:`generate_images`, which runs :func:`malerei.engine.img2img.hires_fix` when they are given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from malerei.commands.generate import _one_line_errors
from malerei.engine.errors import InvalidParameter

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


def add_generation_options(p: argparse.ArgumentParser, *, sizes: str = "the image's size") -> None:
    """generate's model, sampling, output and device options (no prompt file, no --from)."""
    p.add_argument("--negative", metavar="TEXT", default=None, help="negative prompt")
    p.add_argument("--model", metavar="NAME|PATH", default=None,
                   help="model name in --models-dir, or a path (default: the built-in model)")
    p.add_argument("--models-dir", metavar="DIR", type=Path, default=None,
                   help="models folder (default: $MALEREI_MODELS_DIR or the user data dir)")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow pickle checkpoints (.ckpt/.pt/.pth/.bin): they can run code, use only trusted files")
    p.add_argument("--sampler", metavar="NAME", default=None, help="A1111 sampler name (see `malerei samplers`)")
    p.add_argument("--scheduler", metavar="NAME", default=None, help="A1111 schedule type (see `malerei samplers`)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the full schedule (1..150)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (0..30)")
    p.add_argument("--seed", type=int, default=None, help="seed; negative (default -1): a random seed, recorded")
    p.add_argument("--variation-seed", type=int, default=None, help="A1111 variation seed (-1: random)")
    p.add_argument("--variation-strength", type=float, default=None, help="A1111 variation strength (0..1)")
    p.add_argument("--width", type=int, default=None, help=f"processing width, a multiple of 8 (default: {sizes})")
    p.add_argument("--height", type=int, default=None, help=f"processing height, a multiple of 8 (default: {sizes})")
    p.add_argument("--batch", type=int, default=None, help="images (1..64), seeds SEED..SEED+N-1")
    p.add_argument("--clip-skip", type=int, default=None, help="A1111 clip skip (1: last layer)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None, help="output folder (default: ./outputs)")
    p.add_argument("--device", default=None, help="auto, cuda, cuda:N, mps or cpu (default: auto)")
    p.add_argument("--dtype", default=None, help="auto, fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on cpu)")
    p.add_argument("--attention-slicing", action="store_true", default=None, help="less VRAM, a little slower")
    p.add_argument("--vae-tiling", action="store_true", default=None, help="encode/decode large images tile by tile")
    p.add_argument("--cpu-offload", choices=("model", "sequential"), default=None,
                   help="keep weights in CPU memory, move them to the GPU when used")


def _add_inpaint_options(p: argparse.ArgumentParser, *, strength: float, content: str, only_masked: bool) -> None:
    p.add_argument("--strength", type=float, default=strength,
                   help=f"denoising strength: above 0 up to 1 (default {strength}); s runs the last s of the schedule")
    p.add_argument("--mask-blur", type=float, default=4.0, help="Gaussian blur of the mask edge, px (0..64, default 4)")
    p.add_argument("--masked-content", choices=MASKED_CONTENT, default=content,
                   help=f"what the masked area starts from (default: {content})")
    if only_masked:
        p.add_argument("--only-masked", action="store_true",
                       help="work on the mask's bounding box (+ padding) at full processing size, paste it back")
        p.add_argument("--padding", type=int, default=32, help="only-masked padding around the mask, px (default 32)")


def register(sub: argparse._SubParsersAction) -> None:
    p = _one_line_errors(sub.add_parser(
        "img2img", help="change an image with a prompt: write PNGs and print their paths",
        description="Encode IMAGE, noise it to the denoising strength and sample it with PROMPT.",
    ))
    p.add_argument("image", type=Path, help="input image (PNG, JPEG or WebP)")
    p.add_argument("prompt", help="the prompt (A1111 syntax)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="denoising strength: above 0 up to 1 (default 0.75); s runs the last s of the schedule")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="just resize",
                   help="how the image meets --width/--height (default: just resize)")
    add_generation_options(p)
    p.set_defaults(func=cmd_img2img)

    p = _one_line_errors(sub.add_parser(
        "inpaint", help="repaint the masked part of an image: write PNGs and print their paths",
        description="Repaint the white part of --mask (or the transparent pixels of IMAGE) with PROMPT; "
                    "pixels outside the blurred mask stay as they were.",
    ))
    p.add_argument("image", type=Path, help="input image (PNG, JPEG or WebP; with alpha: the mask when --mask is not given)")
    p.add_argument("prompt", help="the prompt (A1111 syntax)")
    p.add_argument("--mask", metavar="MASK", type=Path, default=None,
                   help="black/white image of IMAGE's size, white = repaint (default: IMAGE's alpha channel)")
    _add_inpaint_options(p, strength=0.75, content="original", only_masked=True)
    add_generation_options(p, sizes="the image's size; with --only-masked the model's")
    p.set_defaults(func=cmd_inpaint)

    p = _one_line_errors(sub.add_parser(
        "outpaint", help="extend an image's canvas and paint the new area: write PNGs and print their paths",
        description="Grow the canvas by --left/--right/--up/--down pixels and paint the new area with PROMPT.",
    ))
    p.add_argument("image", type=Path, help="input image (PNG, JPEG or WebP)")
    p.add_argument("prompt", help="the prompt (A1111 syntax)")
    for side in ("left", "right", "up", "down"):
        p.add_argument(f"--{side}", type=int, default=0, metavar="N", help=f"pixels to add on the {side} (default 0)")
    _add_inpaint_options(p, strength=0.8, content="fill", only_masked=False)
    add_generation_options(p, sizes="the new canvas size")
    p.set_defaults(func=cmd_outpaint)


# ---------------------------------------------------------------------------------------------
# Shared running


def make_params(args, prompt: str):
    """GenerationParams from the options given (the rest: the model's defaults), checked."""
    from malerei.commands.generate import _given, _make_params
    from malerei.engine.pipeline import check_request

    params = _make_params({**_given(args), "prompt": prompt})
    check_request(params)
    return params


def memory_options(args) -> dict:
    return {"attention_slicing": bool(args.attention_slicing), "vae_tiling": bool(args.vae_tiling),
            "cpu_offload": args.cpu_offload or "none"}


def load_checked_model(args):
    """The model of --model, after cheap checks (missing model, corrupt safetensors) and quieting."""
    from malerei.commands.generate import _quiet_libraries
    from malerei.engine.model_dir import resolve_model

    path = resolve_model(args.model, args.models_dir)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from malerei.engine.checkpoint_files import read_safetensors_header

        read_safetensors_header(path)
    _quiet_libraries()
    from malerei.engine.devices import MemoryOptions
    from malerei.engine.loading import load_model

    memory = memory_options(args)
    return load_model(args.model, models_dir=args.models_dir, allow_pickle=bool(args.allow_pickle),
                      device=args.device, dtype=args.dtype,
                      memory=MemoryOptions(attention_slicing=memory["attention_slicing"],
                                           vae_tiling=memory["vae_tiling"], cpu_offload=memory["cpu_offload"]))


def output_folder(args) -> Path:
    from malerei.commands.generate import DEFAULT_OUT, _prepare_out

    return _prepare_out(args.out if args.out is not None else DEFAULT_OUT)


def write_results(results, out: Path, *, memory: dict | None = None) -> None:
    """Each result as a numbered PNG with infotext and recipe; its path on stdout."""
    from malerei.commands.generate import reserve_path
    from malerei.engine import metadata

    for result in results:
        recipe = dict(result.recipe, memory=dict(memory)) if memory is not None else result.recipe
        path = reserve_path(out, result.seed)
        metadata.write_png(result.image, path, infotext=result.infotext, recipe=recipe)
        print(path, flush=True)


def run_with_progress(label_seed: int, batch: int, work):
    """``work(progress)`` under generate's progress bar on stderr; out of memory -> one error line."""
    import torch

    from malerei.commands.generate import _Progress

    with _Progress(1) as bar:
        update, done = bar.job(0, label_seed, batch)
        try:
            results = work(update)
        except torch.OutOfMemoryError:
            raise InvalidParameter("out of device memory; try a smaller size or batch, --attention-slicing, "
                                   "--vae-tiling or --cpu-offload model") from None
        done()
    return results


def _read_input(path: Path):
    from malerei.engine.images import read_image

    return read_image(path, what="image")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_img2img(args) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.engine import images, img2img

    params = make_params(args, args.prompt)
    img2img.check_strength(args.strength)
    images.check_resize_mode(args.resize_mode)
    image = _read_input(args.image)
    out = output_folder(args)
    model = load_checked_model(args)
    results = run_with_progress(params.seed, params.batch_size, lambda update: img2img.img2img(
        model, params, image, strength=args.strength, resize_mode=args.resize_mode, progress=update,
        models_dir=args.models_dir))
    write_results(results, out, memory=memory_options(args))
    return 0


def _inpaint_options(args, *, only_masked: bool):
    from malerei.engine import img2img

    return img2img.check_inpaint_options(img2img.InpaintOptions(
        strength=args.strength, mask_blur=args.mask_blur, masked_content=args.masked_content,
        only_masked=only_masked, padding=getattr(args, "padding", 32)))


def cmd_inpaint(args) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.engine import images, img2img

    params = make_params(args, args.prompt)
    options = _inpaint_options(args, only_masked=bool(args.only_masked))
    image = _read_input(args.image)
    if args.mask is not None:
        mask = images.read_mask(args.mask, size=image.size, what="mask")
    else:
        mask = images.mask_from_alpha(image)
    images.check_mask_not_empty(mask)
    out = output_folder(args)
    model = load_checked_model(args)
    results = run_with_progress(params.seed, params.batch_size, lambda update: img2img.inpaint(
        model, params, image, mask, options=options, progress=update, models_dir=args.models_dir))
    write_results(results, out, memory=memory_options(args))
    return 0


def cmd_outpaint(args) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.engine import img2img

    params = make_params(args, args.prompt)
    options = _inpaint_options(args, only_masked=False)
    sides = {"left": args.left, "right": args.right, "up": args.up, "down": args.down}
    for name, value in sides.items():
        if not 0 <= value <= img2img.MAX_EXTEND:
            raise InvalidParameter(f"--{name} {value} is out of range; allowed: 0..{img2img.MAX_EXTEND} px")
    if not any(sides.values()):
        raise InvalidParameter("nothing to outpaint: give at least one of --left, --right, --up, --down above 0")
    image = _read_input(args.image)
    out = output_folder(args)
    model = load_checked_model(args)
    results = run_with_progress(params.seed, params.batch_size, lambda update: img2img.outpaint(
        model, params, image, **sides, options=options, progress=update, models_dir=args.models_dir))
    write_results(results, out, memory=memory_options(args))
    return 0


# ---------------------------------------------------------------------------------------------
# Hires fix for `malerei generate` (its owner wires these two in; see the module docstring)


def add_hires_options(p: argparse.ArgumentParser) -> None:
    """--hires-scale turns the hires fix on; the other --hires-* options tune it."""
    p.add_argument("--hires-scale", type=float, default=None, metavar="X",
                   help="hires fix: generate at --width/--height, upscale X times (above 1 up to 4), img2img again")
    p.add_argument("--hires-upscaler", default="Latent", metavar="NAME",
                   help="Latent (default), Latent (nearest), Latent (bicubic), ..., Lanczos, Nearest, or an "
                        "upscaler model name/path (ESRGAN, SwinIR, ... via spandrel)")
    p.add_argument("--hires-strength", type=float, default=0.7, metavar="S",
                   help="denoising strength of the second pass (default 0.7)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="steps of the second pass (default: as the first)")


def hires_options(args):
    """The HiresOptions the command line asks for, checked, or None when --hires-scale is not given."""
    if getattr(args, "hires_scale", None) is None:
        return None
    from malerei.engine.img2img import HiresOptions, check_hires_options

    return check_hires_options(HiresOptions(scale=args.hires_scale, upscaler=args.hires_upscaler,
                                            strength=args.hires_strength, steps=args.hires_steps))


def hires_upscaler(options, args):
    """The upscaler model a hires fix names (None for the latent and plain resize modes)."""
    from malerei.engine.img2img import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS

    if options is None or options.upscaler in LATENT_UPSCALE_MODES or options.upscaler in PIXEL_UPSCALERS:
        return None
    from malerei.engine.upscale import load_upscaler

    return load_upscaler(options.upscaler, models_dir=args.models_dir, allow_pickle=bool(args.allow_pickle),
                         device=args.device)


def generate_images(model, params, args, *, upscaler=None, **kwargs):
    """``pipeline.generate`` or, with --hires-scale, ``img2img.hires_fix`` (same keyword arguments)."""
    options = hires_options(args)
    if options is None:
        from malerei.engine.pipeline import generate

        return generate(model, params, **kwargs)
    from malerei.engine.img2img import hires_fix

    return hires_fix(model, params, options, upscaler=upscaler, **kwargs)
