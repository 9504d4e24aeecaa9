"""Scenes of the shapes world: sampling them and writing their captions (SHAPES.md).

A scene is plain data; rendering and reading live in their own modules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from malerei.world.vocab import (
    CELL_CENTRES,
    CELL_TO_POSITION,
    COLOURS,
    HELD_OUT,
    POSITION_JITTER,
    SHAPES,
    SIZE_JITTER,
    SIZES,
)


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (column, row)
    # Geometry in px at 64; the renderer scales by canvas/64.
    cx: float
    cy: float
    extent: float

    @property
    def position(self) -> str:
        return CELL_TO_POSITION[self.cell]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]
    # Which phrases the caption leaves out (training-time robustness variants only).
    drop: frozenset[str] = field(default_factory=frozenset)

    @property
    def caption(self) -> str:
        return caption_of(self)


def object_phrase(obj: WorldObject, *, with_size: bool = True, with_position: bool = True) -> str:
    words = ["a"]
    if with_size:
        words.append(obj.size)
    words += [obj.colour, obj.shape]
    if with_position:
        words.append(obj.position)
    return " ".join(words)


def caption_of(scene: Scene) -> str:
    """`a {size} {colour} {shape} {position} [and a ...] on a {background} background`."""
    with_size = "size" not in scene.drop
    with_position = "position" not in scene.drop
    text = " and ".join(
        object_phrase(o, with_size=with_size, with_position=with_position) for o in scene.objects
    )
    if "background" not in scene.drop:
        text += f" on a {scene.background} background"
    return text


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT


# Cell pairs two objects may occupy: never neighbours, not even diagonally, so at least one
# cell lies between them in a row or column (Chebyshev distance >= 2).
ALL_CELLS = [(c, r) for r in range(3) for c in range(3)]
TWO_OBJECT_CELL_PAIRS = [
    (a, b) for a, b in itertools.permutations(ALL_CELLS, 2) if max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2
]


def _pairs(split: str) -> list[tuple[str, str]]:
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if split == "train":
        return [p for p in every if p not in HELD_OUT]
    if split == "heldout":
        return sorted(HELD_OUT)
    if split == "any":
        return every
    raise ValueError(f"unknown split {split!r}; use train, heldout or any")


def _make_object(rng: np.random.Generator, colour: str, shape: str, cell: tuple[int, int]) -> WorldObject:
    size = str(rng.choice(list(SIZES)))
    extent = SIZES[size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    cx = CELL_CENTRES[cell[0]] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = CELL_CENTRES[cell[1]] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    return WorldObject(shape=shape, colour=colour, size=size, cell=cell, cx=cx, cy=cy, extent=extent)


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int,
    split: str = "train",
    drop_probability: float = 0.0,
) -> Scene:
    """Draw a random scene.

    split: "train" uses only seen colour-shape pairs, "heldout" only held-out ones (for one
    object; a two-object held-out scene has one held-out object and one seen one), "any" all.
    drop_probability: chance that each of the size / position / background phrases is left out
    of the caption (training robustness; the attributes are random either way).
    """
    if n_objects not in (1, 2):
        raise ValueError("a scene has one or two objects")
    if n_objects == 1:
        cells = [ALL_CELLS[rng.integers(len(ALL_CELLS))]]
    else:
        cells = list(TWO_OBJECT_CELL_PAIRS[rng.integers(len(TWO_OBJECT_CELL_PAIRS))])
    if split == "heldout" and n_objects == 2:
        pair_lists = [_pairs("heldout"), _pairs("train")]
    else:
        pair_lists = [_pairs(split)] * n_objects
    chosen = [p[rng.integers(len(p))] for p in pair_lists]
    if n_objects == 2 and rng.random() < 0.5:
        chosen.reverse()  # the held-out object is not always named first
    # Background differs from every object's colour.
    backgrounds = [c for c in COLOURS if c not in {colour for colour, _ in chosen}]
    background = backgrounds[rng.integers(len(backgrounds))]
    objects = tuple(_make_object(rng, colour, shape, cell) for (colour, shape), cell in zip(chosen, cells))
    drop = frozenset(p for p in ("size", "position", "background") if rng.random() < drop_probability)
    return Scene(background=background, objects=objects, drop=drop)
