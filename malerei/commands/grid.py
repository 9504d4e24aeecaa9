"""``malerei grid``: A1111's X/Y/Z plot, written as one labelled PNG.

    malerei grid "a red circle" --x "steps:10,20,30" --y "cfg:3,7" --seed 42
    malerei grid "a red circle on a blue background" --x "prompt:red,green,yellow" --z "sampler:Euler,DDIM"
    malerei grid "a green square" --init photo.png --x "strength:0.3,0.5,0.7"

Every cell uses the same seed (unless a seed axis varies it) and the options given here; an axis
value overrides its setting for its row/column. Axis syntax: :mod:`malerei.engine.grid`. The grid
PNG's infotext is that of its first cell; its recipe lists the axes and every cell's infotext.
The path is printed on stdout; mistakes end in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from malerei.commands.generate import _one_line_errors
from malerei.engine.errors import InvalidParameter


def register(sub: argparse._SubParsersAction) -> None:
    from malerei.commands.edit import add_generation_options

    p = _one_line_errors(sub.add_parser(
        "grid", help="X/Y/Z plot over sampler, scheduler, steps, CFG, seed, strength, model, prompt S/R",
        description="Generate one image per combination of the axes' values and write them as one labelled "
                    "PNG. Axis: TYPE:VALUES with TYPE one of sampler, scheduler, steps, cfg, seed, strength, "
                    "model, prompt (search/replace: the first value is replaced by each value). Ranges: "
                    "1-5, 1-9 (+2), 1-10 [4].",
    ))
    p.add_argument("prompt", help="the prompt (A1111 syntax)")
    p.add_argument("--x", metavar="TYPE:VALUES", default=None, help="the X axis (columns)")
    p.add_argument("--y", metavar="TYPE:VALUES", default=None, help="the Y axis (rows)")
    p.add_argument("--z", metavar="TYPE:VALUES", default=None, help="the Z axis (one grid per value)")
    p.add_argument("--init", metavar="IMAGE", type=Path, default=None,
                   help="img2img every cell from this image (needed by a strength axis)")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength with --init (default 0.75)")
    add_generation_options(p, sizes="the model's default, or --init's size")
    p.set_defaults(func=cmd_grid)


def cmd_grid(args) -> int:
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.commands import edit
    from malerei.engine import grid, noise

    axes = [grid.parse_axis(text) if text else None for text in (args.x, args.y, args.z)]
    if not any(axes):
        raise InvalidParameter("a grid needs at least one axis: --x TYPE:VALUES (and --y, --z)")
    if args.batch not in (None, 1):
        raise InvalidParameter("--batch does not apply to a grid: every cell is one image")
    grid.check_axes(axes, args.prompt, has_image=args.init is not None)
    base = edit.make_params(args, args.prompt)
    seed = noise.resolve_seed(base.seed)  # one seed for every cell
    image = None
    if args.init is not None:
        from malerei.engine.img2img import check_strength

        check_strength(args.strength)
        image = edit._read_input(args.init)
    cells_plan = _plan(axes, base, seed, args)
    out = edit.output_folder(args)
    from malerei.commands.generate import _quiet_libraries

    _quiet_libraries()
    models: dict = {}
    results = []
    for index, (where, fields, model_ref) in enumerate(cells_plan):
        model = _model(models, model_ref, args)
        results.append((where, _cell(model, fields, image, args)))
        print(f"grid: cell {index + 1}/{len(cells_plan)}", file=sys.stderr, flush=True)
    _write(axes, results, out, memory=edit.memory_options(args))
    return 0


def _plan(axes, base, seed: int, args) -> list:
    """[((x, y, z), GenerationParams fields, model ref)] in Z, Y, X order."""
    import dataclasses
    import itertools

    from malerei.engine import grid

    ranges = [range(len(a.values)) if a is not None else range(1) for a in axes]
    plan = []
    start = dataclasses.asdict(base)
    for z, y, x in itertools.product(ranges[2], ranges[1], ranges[0]):
        fields = dict(start, seed=seed, batch_size=1, strength=args.strength, model=args.model)
        for axis, i in zip(axes, (x, y, z)):
            if axis is not None:
                grid.apply(axis, axis.values[i], fields, args.prompt)
        model_ref = fields.pop("model")
        plan.append(((x, y, z), fields, model_ref))
    for _, fields, _ in plan:  # every cell's settings are checked before any model loads
        _params(fields)
    return plan


def _params(fields: dict):
    from malerei.engine.pipeline import GenerationParams, check_request

    params = GenerationParams(**{k: v for k, v in fields.items() if k != "strength"})
    check_request(params)
    return params


def _model(cache: dict, ref, args):
    if ref not in cache:
        from malerei.commands import edit

        cache.clear()  # one model in memory at a time
        cache[ref] = edit.load_checked_model(argparse.Namespace(**{**vars(args), "model": ref}))
    return cache[ref]


def _cell(model, fields: dict, image, args):
    params = _params(fields)
    if image is not None:
        from malerei.engine.img2img import img2img

        return img2img(model, params, image, strength=fields["strength"], models_dir=args.models_dir)[0]
    from malerei.engine.pipeline import generate

    return generate(model, params, preview_every=0, models_dir=args.models_dir)[0]


def _write(axes, results, out: Path, *, memory: dict) -> None:
    from PIL import Image

    from malerei.commands.generate import reserve_path
    from malerei.engine import grid, metadata

    size = results[0][1].image.size
    counts = [len(a.values) if a is not None else 1 for a in axes]
    cells = [[[None] * counts[0] for _ in range(counts[1])] for _ in range(counts[2])]
    for (x, y, z), result in results:
        picture = result.image if result.image.size == size else result.image.resize(size, Image.Resampling.LANCZOS)
        cells[z][y][x] = picture

    def labels(axis):
        return [axis.text(v) for v in axis.values] if axis is not None else []

    sheet = grid.draw_grid(cells, x_labels=labels(axes[0]), y_labels=labels(axes[1]), z_labels=labels(axes[2]))
    first = results[0][1]
    recipe = {
        "format": metadata.RECIPE_FORMAT, "format_version": metadata.RECIPE_FORMAT_VERSION, "kind": "grid",
        "axes": [{"axis": name, "type": a.kind, "values": list(a.values)}
                 for name, a in zip("xyz", axes) if a is not None],
        "cells": [{"x": x, "y": y, "z": z, "seed": r.seed, "infotext": r.infotext} for (x, y, z), r in results],
        "first_cell": first.recipe, "memory": memory,
    }
    path = reserve_path(out, "grid")
    metadata.write_png(sheet, path, infotext=first.infotext, recipe=recipe)
    print(path, flush=True)
