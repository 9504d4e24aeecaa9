"""``malerei upscale`` and ``malerei restore``: enlarge or repair images with spandrel models.

    malerei upscale photo.png --scale 4                       # the built-in shapes-world x4 model
    malerei upscale photo.png --scale 2 --model RealESRGAN_x4plus --allow-pickle
    malerei restore face.png --model GFPGANv1.4.safetensors --strength 0.8

Each written PNG's path is printed on its own line; the PNG keeps the source's A1111 infotext
(with A1111's ``Postprocess ...`` fields added) and gets a malerei recipe naming the source file's
hash, the model and the settings. Mistakes end in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from malerei.commands.generate import _one_line_errors


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="input image(s): PNG, JPEG or WebP")
    p.add_argument("--models-dir", metavar="DIR", type=Path, default=None,
                   help="models folder (default: $MALEREI_MODELS_DIR or the user data dir)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .pth/.pt/.ckpt/.bin weights (loaded with torch.load(weights_only=True)); "
                        "use only trusted files")
    p.add_argument("--tile", type=int, default=192, help="tile size in input pixels (16..4096, default 192)")
    p.add_argument("--tile-overlap", type=int, default=32, help="context around each tile, px (default 32)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None, help="output folder (default: ./outputs)")
    p.add_argument("--device", default=None, help="auto, cuda, cuda:N, mps or cpu (default: auto)")


def register(sub: argparse._SubParsersAction) -> None:
    p = _one_line_errors(sub.add_parser(
        "upscale", help="enlarge images with a super-resolution model: write PNGs and print their paths",
        description="Enlarge each IMAGE --scale times with a spandrel super-resolution model (ESRGAN, "
                    "Real-ESRGAN, SwinIR, HAT, DAT, Compact, ...) in overlapping tiles.",
    ))
    p.add_argument("--scale", type=float, default=4.0,
                   help="enlargement factor, e.g. 2 or 4 (1..8, default 4); the model runs until the image is at "
                        "least that large, then Lanczos gives the exact size (an x4 model at --scale 2: x4, "
                        "then halved)")
    p.add_argument("--model", metavar="NAME|PATH", default=None,
                   help="upscaler file, or its name in the models folder's ESRGAN/, RealESRGAN/, SwinIR/, "
                        "upscale_models/ (default: the built-in shapes-world model)")
    _add_common(p)
    p.set_defaults(func=cmd_upscale)

    p = _one_line_errors(sub.add_parser(
        "restore", help="restore faces / images (GFPGAN, CodeFormer, ...): write PNGs and print their paths",
        description="Restore each IMAGE with a spandrel restoration model and mix it with the input by --strength.",
    ))
    p.add_argument("--strength", type=float, default=1.0, help="0: the input, 1: the model's output (default 1)")
    p.add_argument("--model", metavar="NAME|PATH", default=None,
                   help="restorer file, or its name in the models folder's GFPGAN/, Codeformer/, "
                        "facerestore_models/ (default: the built-in shapes-world restorer)")
    _add_common(p)
    p.set_defaults(func=cmd_restore)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_metadata(path: Path):
    """The source's infotext and recipe when it has them (PNG chunks, A1111 JPEG/WebP EXIF)."""
    from malerei.engine import metadata
    from malerei.engine.errors import ImageError

    try:
        return metadata.read_png_metadata(path)
    except ImageError:
        return metadata.ImageMetadata(infotext=None)


def _infotext(source, fields: dict) -> str:
    from malerei.engine import metadata

    params = {k: v for k, v in source.params.items() if k not in ("Prompt", "Negative prompt")}
    params.update(fields)
    return metadata.format_infotext(prompt=source.params.get("Prompt", ""),
                                    negative_prompt=source.params.get("Negative prompt", ""), params=params)


def _write(image, out: Path, stem: str, *, infotext: str, recipe: dict) -> None:
    from malerei.commands.generate import reserve_path
    from malerei.engine import metadata

    path = reserve_path(out, stem)
    metadata.write_png(image, path, infotext=infotext, recipe=recipe)
    print(path, flush=True)


def _model_record(model) -> dict:
    return {"name": model.name, "architecture": model.architecture, "purpose": model.purpose,
            "scale": model.scale, "short_hash": model.short_hash, "file": model.path.name}


def _prepare(args):
    """Checks that need no model, then the inputs (read and validated), then the output folder."""
    from malerei.commands.edit import output_folder
    from malerei.engine.images import read_image
    from malerei.engine.offline import enforce_offline
    from malerei.engine.upscale import _check_tiling

    enforce_offline()
    _check_tiling(args.tile, args.tile_overlap)
    inputs = [(path, read_image(path, what="image")) for path in args.images]
    return inputs, output_folder(args)


def cmd_upscale(args) -> int:
    from malerei.engine import metadata
    from malerei.engine.upscale import check_scale, load_upscaler, upscale_image

    scale = check_scale(args.scale)
    inputs, out = _prepare(args)
    model = load_upscaler(args.model, models_dir=args.models_dir, allow_pickle=args.allow_pickle, device=args.device)
    for path, image in inputs:
        result = upscale_image(model, image, scale, tile=args.tile, overlap=args.tile_overlap)
        source = _source_metadata(path)
        infotext = _infotext(source, {"Postprocess upscale by": scale, "Postprocess upscaler": model.name})
        recipe = {"format": metadata.RECIPE_FORMAT, "format_version": metadata.RECIPE_FORMAT_VERSION,
                  "kind": "upscale", "versions": metadata.library_versions(),
                  "source": {"file": path.name, "sha256": _sha256(path), "size": list(image.size),
                             "recipe": source.recipe},
                  "upscaler": _model_record(model), "scale": scale, "size": list(result.size),
                  "tile": args.tile, "tile_overlap": args.tile_overlap}
        _write(result, out, f"{path.stem}-x{metadata.format_value(scale)}", infotext=infotext, recipe=recipe)
    return 0


def cmd_restore(args) -> int:
    from malerei.engine import metadata
    from malerei.restore import load_restorer, restore_image
    from malerei.restore.restorer import check_strength

    strength = check_strength(args.strength)
    inputs, out = _prepare(args)
    model = load_restorer(args.model, models_dir=args.models_dir, allow_pickle=args.allow_pickle, device=args.device)
    for path, image in inputs:
        result = restore_image(model, image, strength=strength, tile=args.tile, overlap=args.tile_overlap)
        source = _source_metadata(path)
        infotext = _infotext(source, {"Postprocess restorer": model.name, "Postprocess restore strength": strength})
        recipe = {"format": metadata.RECIPE_FORMAT, "format_version": metadata.RECIPE_FORMAT_VERSION,
                  "kind": "restore", "versions": metadata.library_versions(),
                  "source": {"file": path.name, "sha256": _sha256(path), "size": list(image.size),
                             "recipe": source.recipe},
                  "restorer": _model_record(model), "strength": strength,
                  "tile": args.tile, "tile_overlap": args.tile_overlap}
        _write(result, out, f"{path.stem}-restored", infotext=infotext, recipe=recipe)
    return 0
