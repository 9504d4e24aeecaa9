"""``malerei samplers``, ``malerei models`` and ``malerei info``: what there is, and how an image
was made. Registered by :mod:`malerei.commands.generate` (they share its one-line error parsers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from malerei.engine.errors import ImageError


def register(sub: argparse._SubParsersAction, one_line_errors) -> None:
    p = one_line_errors(sub.add_parser(
        "samplers", help="list sampler names and schedule types",
        description="The A1111 sampler names and schedule types `generate --sampler/--scheduler` accept, "
                    "and what runs each one.",
    ))
    p.set_defaults(func=cmd_samplers)

    p = one_line_errors(sub.add_parser(
        "models", help="list models with their short hashes",
        description="Checkpoints and diffusers folders in the models folder (and the built-in model), "
                    "with A1111's short hash (first 10 hex digits of the SHA-256).",
    ))
    p.add_argument("--models-dir", metavar="DIR", type=Path, default=None,
                   help="models folder (default: $MALEREI_MODELS_DIR or the user data dir)")
    p.set_defaults(func=cmd_models)

    p = one_line_errors(sub.add_parser(
        "info", help="show how an image was made",
        description="Print the A1111 parameters and the malerei recipe of a PNG written by malerei, "
                    "or the parameters of an image written by A1111 (PNG, JPEG, WebP).",
    ))
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_info)


def _console():
    from rich.console import Console

    return Console(highlight=False)


def cmd_samplers(args) -> int:
    from rich.table import Table

    from malerei.engine import samplers

    every = {s.name for s in samplers.list_schedules()} - {"automatic"}
    table = Table(title="Samplers (--sampler)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("Automatic is")
    table.add_column("stochastic")
    table.add_column("schedule types")
    table.add_column("runs as", overflow="fold")
    for info in samplers.list_samplers():
        if set(info.schedules) == every:
            schedules = "all"
        else:
            schedules = ", ".join(samplers.schedule_label(s) for s in info.schedules) or "Automatic only"
        table.add_row(info.name, samplers.schedule_label(info.default_schedule),
                      "yes" if info.stochastic else "-", schedules, info.implementation)
    console = _console()
    console.print(table)

    table = Table(title="Schedule types (--scheduler)", title_justify="left")
    for column in ("name", "also accepted", "what it is"):
        table.add_column(column)
    for sched in samplers.list_schedules():
        table.add_row(sched.label, ", ".join((sched.name, *sched.aliases)), sched.description)
    console.print(table)
    return 0


def cmd_models(args) -> int:
    from rich.table import Table

    from malerei.engine.model_dir import BUILTIN_MODEL_DIR, default_models_dir, is_diffusers_folder, list_models
    from malerei.engine.model_dir import model_short_hash

    folder = args.models_dir if args.models_dir is not None else default_models_dir()
    if args.models_dir is not None and not folder.is_dir():
        from malerei.engine.errors import ModelNotFound

        raise ModelNotFound(f"models folder {folder} does not exist")
    rows = []
    if is_diffusers_folder(BUILTIN_MODEL_DIR):
        rows.append(("(built-in)", "diffusers", "", model_short_hash(BUILTIN_MODEL_DIR) or "?", str(BUILTIN_MODEL_DIR)))
    for entry in list_models(folder):
        rows.append((entry.name, entry.kind, entry.family_if_cheap or "?", entry.short_hash or "?", str(entry.path)))
    console = _console()
    if not rows:
        console.print(f"no models in {folder}")
        return 0
    table = Table(title=f"Models in {folder}", title_justify="left")
    for column in ("name", "kind", "family", "hash", "path"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def cmd_info(args) -> int:
    from malerei.engine import metadata

    meta = metadata.read_png_metadata(args.image)
    if meta.infotext is None and meta.recipe is None:
        raise ImageError(f"{args.image} has no generation parameters (no A1111 infotext, no malerei recipe)")
    params = metadata.infotext_to_params(meta.params) if meta.infotext else None
    if args.json:
        print(json.dumps({"infotext": meta.infotext, "params": params, "recipe": meta.recipe},
                         indent=2, ensure_ascii=False))
        return 0
    made_by = "malerei" if meta.recipe is not None else "A1111 (or a compatible tool)"
    print(f"{args.image}: made by {made_by}")
    if meta.infotext:
        print("\nparameters:")
        print(meta.infotext)
    if meta.recipe is not None:
        print("\nrecipe:")
        print(json.dumps(meta.recipe, indent=2, ensure_ascii=False))
    elif params is not None:
        print("\nparsed:")
        print(json.dumps(params, indent=2, ensure_ascii=False))
    return 0
