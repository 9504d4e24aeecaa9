"""Data preparation as its own step (nanoGPT style): render scenes into shards that training reads.

A shard is one ``.npz`` file: ``images`` uint8 [N, S, S, 3] and ``captions`` (str). Shard i is
rendered from seed (seed, i) alone, so any shard can be re-rendered and rendering parallelises.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malerei.world.render import render
from malerei.world.scene import sample_scene


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    size: int = 64
    two_object_fraction: float = 0.5  # binding of two objects is the hard case: train on it a lot
    drop_probability: float = 0.1  # each of size/position/background phrases dropped this often
    split: str = "train"  # training never sees held-out pairs


def render_shard(index: int, count: int, seed: int, spec: ShardSpec) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, index])
    images = np.empty((count, spec.size, spec.size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        n_objects = 2 if rng.random() < spec.two_object_fraction else 1
        scene = sample_scene(rng, n_objects=n_objects, split=spec.split, drop_probability=spec.drop_probability)
        images[i] = render(scene, spec.size)
        captions.append(scene.caption)
    return images, captions


def _write_shard(args: tuple[Path, int, int, int, ShardSpec]) -> Path:
    out, index, count, seed, spec = args
    images, captions = render_shard(index, count, seed, spec)
    path = out / f"shard_{index:05d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, captions=np.asarray(captions))
    tmp.replace(path)
    return path


def write_shards(
    out: Path,
    *,
    n: int,
    seed: int = 0,
    shard_size: int = 10_000,
    spec: ShardSpec = ShardSpec(),
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Render `n` scenes into `out/shard_*.npz` (+ `meta.json`). Existing complete shards are kept."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index, start in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - start)
        path = out / f"shard_{index:05d}.npz"
        if path.exists():
            if progress:
                progress(count)
            continue
        jobs.append((out, index, count, seed, spec))
    paths: list[Path] = []
    if workers <= 1:
        for job in jobs:
            paths.append(_write_shard(job))
            if progress:
                progress(job[2])
    else:
        with ProcessPoolExecutor(workers) as pool:
            for job, path in zip(jobs, pool.map(_write_shard, jobs)):
                paths.append(path)
                if progress:
                    progress(job[2])
    meta = {"n": n, "seed": seed, "shard_size": shard_size, "spec": spec.__dict__}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return sorted(out.glob("shard_*.npz"))


def read_shards(directory: Path) -> tuple[np.ndarray, list[str]]:
    """All images and captions of a shard directory, in shard order."""
    paths = sorted(Path(directory).glob("shard_*.npz"))
    if not paths:
        raise FileNotFoundError(f"no shard_*.npz files in {directory}; render some with `malerei world render`")
    images, captions = [], []
    for p in paths:
        with np.load(p) as f:
            images.append(f["images"])
            captions.extend(str(c) for c in f["captions"])
    return np.concatenate(images), captions
