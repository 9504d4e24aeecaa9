"""The evaluator's fixed list of prompts and seeds (SHAPES.md: fully specified captions only).

300 one-object captions (240 seen colour-shape pairs, 60 held-out) and 100 two-object captions
(seen pairs: two-object adherence measures binding, held-out pairs are measured on one object).
The list is a pure function of EVAL_SEED, so every run and every model is judged on the same set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from malerei.world.scene import Scene, sample_scene

EVAL_SEED = 20260101


@dataclass(frozen=True)
class EvalCase:
    group: str  # "seen" | "heldout" | "two"
    scene: Scene  # the caption's ground truth (its rendering is one valid image of the caption)
    seed: int  # generation seed

    @property
    def caption(self) -> str:
        return self.scene.caption


def eval_cases(*, seen: int = 240, heldout: int = 60, two: int = 100) -> list[EvalCase]:
    rng = np.random.default_rng(EVAL_SEED)
    cases: list[EvalCase] = []
    for group, count, n_objects, split in (
        ("seen", seen, 1, "train"),
        ("heldout", heldout, 1, "heldout"),
        ("two", two, 2, "train"),
    ):
        for _ in range(count):
            scene = sample_scene(rng, n_objects=n_objects, split=split)
            cases.append(EvalCase(group=group, scene=scene, seed=int(rng.integers(0, 2**31 - 1))))
    return cases


def small_eval_cases() -> list[EvalCase]:
    """A quick subset for periodic evaluation during training and for CI."""
    return eval_cases(seen=24, heldout=8, two=16)
