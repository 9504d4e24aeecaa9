"""Pieces every training loop here shares: step-seeded batches, LR schedule, EMA, checkpoints, logs.

Resumability: a batch and its noise are pure functions of (seed, step), and a checkpoint holds the
weights, optimizer, EMA and step, so a run stopped at any checkpoint and resumed reaches the same
weights an uninterrupted run reaches (bitwise on the same device and library versions).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one step's randomness: independent of anything that ran before."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of step `step`'s batch: epochs are seeded permutations, so every sample is seen."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
    return perm[offset * batch_size : (offset + 1) * batch_size]


def learning_rate(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to floor * peak at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a run killed mid-write keeps its previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    # Our own checkpoints hold only tensors, numbers and strings: weights_only suffices.
    return torch.load(path, map_location="cpu", weights_only=True)


def save_config(run_dir: Path, config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))


class LossLog:
    """Appends (step, values...) rows to a CSV; `plot` draws the curves into a PNG."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields
        self._t0 = time.time()
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(["step", *fields])

    def write(self, step: int, **values: float) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{values[k]:.6g}" for k in self.fields)])

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader(self.path.open()))
        if not rows:
            return
        steps = [int(r["step"]) for r in rows]
        fig, axes = plt.subplots(1, len(self.fields), figsize=(5 * len(self.fields), 3.5), squeeze=False)
        for ax, field in zip(axes[0], self.fields):
            ax.plot(steps, [float(r[field]) for r in rows])
            ax.set_title(field)
            ax.set_xlabel("step")
            if field.startswith("loss"):
                ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(png, dpi=80)
        plt.close(fig)


def pick_train_device(name: str | None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
