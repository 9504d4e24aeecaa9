"""D(x, sigma) for the k samplers, built from the pipeline's ``model_fn`` (a raw UNet call).

k-diffusion samplers work on x = x0 + sigma * eps and want the denoised estimate of x0. The UNet
was trained on the variance-preserving x / sqrt(sigma**2 + 1) at a training timestep, and
predicts eps or v (or x0). The preconditioning is Karras et al. 2022, table 1 (VP column) with
sigma_data = 1, i.e. k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``:

    c_in = 1 / sqrt(sigma**2 + 1)
    eps: D = x - sigma * F(c_in x, t(sigma))
    v:   D = x / (sigma**2 + 1) - sigma / sqrt(sigma**2 + 1) * F(c_in x, t(sigma))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from malerei.engine.errors import InvalidParameter

from .discrete import ModelSigmas

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Denoiser:
    """Callable ``D(x, sigma) -> denoised``; ``sigma`` is one noise level for the whole batch."""

    def __init__(self, model_fn: Callable, table: ModelSigmas, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise InvalidParameter(
                f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        self.model_fn = model_fn
        self.table = table
        self.prediction_type = prediction_type

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = float(sigma)
        scale = math.sqrt(sigma**2 + 1)
        t = self.table.sigma_to_t(sigma).to(x.device)
        out = self.model_fn(x / scale, t)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / scale**2 - (sigma / scale) * out
        return out
