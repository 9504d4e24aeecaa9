"""`malerei world render`: data preparation for training (shards of shapes-world renders)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the shapes world: render training data")
    wsub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    r = wsub.add_parser("render", help="render N captioned scenes into shards that training reads")
    r.add_argument("--n", type=int, required=True, help="number of scenes")
    r.add_argument("--size", type=int, default=64, choices=(64, 128, 256), help="canvas size in px")
    r.add_argument("--out", type=Path, required=True, help="output directory for shard_*.npz")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--shard-size", type=int, default=10_000)
    r.add_argument("--two-object-fraction", type=float, default=0.5)
    r.add_argument("--drop-probability", type=float, default=0.1)
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    r.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from malerei.engine.errors import InvalidParameter
    from malerei.world.shards import ShardSpec, write_shards

    if args.n <= 0:
        raise InvalidParameter("--n must be a positive number of scenes")
    if not 0 <= args.two_object_fraction <= 1 or not 0 <= args.drop_probability <= 1:
        raise InvalidParameter("--two-object-fraction and --drop-probability must lie in [0, 1]")
    spec = ShardSpec(size=args.size, two_object_fraction=args.two_object_fraction, drop_probability=args.drop_probability)
    with Progress(TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("render", total=args.n)
        paths = write_shards(
            args.out, n=args.n, seed=args.seed, shard_size=args.shard_size, spec=spec, workers=args.workers,
            progress=lambda k: bar.advance(task, k),
        )
    for p in paths:
        print(p)
    return 0
