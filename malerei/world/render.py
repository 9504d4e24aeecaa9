"""Render shapes-world scenes to RGB arrays (SHAPES.md), anti-aliased by 4x supersampling.

Choices SHAPES.md leaves to us: an object's (cx, cy) is the centre of its bounding box for every
shape (so a triangle's centroid sits extent/6 below it); supersampled pixels are box-filtered.
"""

from __future__ import annotations

import numpy as np

from malerei.world.scene import Scene, WorldObject
from malerei.world.vocab import PALETTE

SUPERSAMPLE = 4
CANVAS_SIZES = (64, 128, 256)


def _coverage(obj: WorldObject, scale: float, size: int) -> tuple[np.ndarray, slice, slice]:
    """Fraction of each pixel covered by the object, over the object's bounding box only."""
    cx, cy, half = obj.cx * scale, obj.cy * scale, obj.extent * scale / 2
    x0, x1 = max(int(np.floor(cx - half)) - 1, 0), min(int(np.ceil(cx + half)) + 1, size)
    y0, y1 = max(int(np.floor(cy - half)) - 1, 0), min(int(np.ceil(cy + half)) + 1, size)
    s = SUPERSAMPLE
    # Sample points at the centres of the sub-pixels.
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    x, y = np.meshgrid(xs, ys)
    if obj.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif obj.shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif obj.shape == "triangle":
        top = cy - half
        # Pointing up: half-width grows from 0 at the apex to `half` at the base.
        inside = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    cov = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cov, slice(y0, y1), slice(x0, x1)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 array [size, size, 3]. Deterministic: the scene holds all randomness."""
    if size not in CANVAS_SIZES:
        raise ValueError(f"canvas size {size} is not one of {CANVAS_SIZES}")
    scale = size / 64
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = PALETTE[scene.background]
    for obj in scene.objects:
        cov, ys, xs = _coverage(obj, scale, size)
        colour = np.asarray(PALETTE[obj.colour], dtype=np.float32)
        region = image[ys, xs]
        image[ys, xs] = region * (1 - cov[..., None]) + colour * cov[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
