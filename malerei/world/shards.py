"""Data preparation as its own step (nanoGPT style): render scenes into shards that training reads.

A shard is one ``.npz`` file: ``images`` uint8 [N, S, S, 3] and ``captions`` (str). Shard i is
rendered from seed (seed, i) alone, so any shard can be re-rendered and rendering parallelises.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from malerei.world.render import render
from malerei.world.scene import Scene, sample_scene
from malerei.world.vocab import COLOURS


@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    size: int = 64
    two_object_fraction: float = 0.5  # binding of two objects is the hard case: train on it a lot
    drop_probability: float = 0.1  # each of size/position/background phrases dropped this often
    split: str = "train"  # training never sees held-out pairs


def shard_scenes(index: int, count: int, seed: int, spec: ShardSpec) -> list[Scene]:
    """The scenes of shard `index`, in order (the same for a seed, so a shard can be re-derived)."""
    rng = np.random.default_rng([seed, index])
    scenes = []
    for _ in range(count):
        n_objects = 2 if rng.random() < spec.two_object_fraction else 1
        scenes.append(sample_scene(rng, n_objects=n_objects, split=spec.split, drop_probability=spec.drop_probability))
    return scenes


def render_shard(index: int, count: int, seed: int, spec: ShardSpec) -> tuple[np.ndarray, list[str]]:
    scenes = shard_scenes(index, count, seed, spec)
    images = np.empty((count, spec.size, spec.size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, spec.size)
    return images, [scene.caption for scene in scenes]


def recoloured_backgrounds(scenes: list[Scene], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each scene rendered again on another background colour (none of its objects' colours), and
    whether its caption names the background (only then does the text say which one is right).
    Training pairs for edits: noise the recoloured image, ask for the captioned one."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    named = np.array(["background" not in scene.drop for scene in scenes])
    for i, scene in enumerate(scenes):
        taken = {scene.background} | {obj.colour for obj in scene.objects}
        others = [c for c in COLOURS if c not in taken]
        images[i] = render(replace(scene, background=others[rng.integers(len(others))]), size)
    return images, named


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


def read_shard_scenes(directory: Path, n: int) -> list[Scene]:
    """The scenes behind the first `n` images of a shard directory, re-derived from its meta.json
    (checked against the stored captions, so a directory rendered another way is refused)."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    spec = ShardSpec(**meta["spec"])
    scenes: list[Scene] = []
    for index, start in enumerate(range(0, min(n, meta["n"]), meta["shard_size"])):
        count = min(meta["shard_size"], meta["n"] - start)
        shard = shard_scenes(index, count, meta["seed"], spec)
        with np.load(directory / f"shard_{index:05d}.npz") as f:
            stored = [str(c) for c in f["captions"]]
        if [scene.caption for scene in shard] != stored:
            raise ValueError(f"{directory / f'shard_{index:05d}.npz'} does not match its meta.json's seed and spec")
        scenes.extend(shard)
    return scenes[:n]
