"""Seeds and noise: every random number a job uses comes from one ``torch.Generator`` per image.

Rules (the same as A1111 and as diffusers with a list of CPU generators):

- A batch of N images with seed ``s`` uses seeds ``s, s+1, ..., s+N-1``; image i draws only from
  its own generator, so image i of a batch equals image i generated alone with seed ``s+i``.
- Generators live on the CPU by default, so a seed gives the same starting noise on CPU, CUDA,
  ROCm and MPS. Noise is drawn in float32 and then cast (for float16/bfloat16 this gives the same
  numbers as drawing in that dtype, which is what diffusers' ``randn_tensor`` does).
- The initial latent noise is the generator's first draw, of shape ``(1, C, H, W)``: the same
  numbers as diffusers' ``prepare_latents`` with ``torch.Generator("cpu").manual_seed(s)``. The
  same generator then keeps feeding that image's per-step noise (ancestral/SDE samplers).
- Variation seed (A1111 "Variation seed" / "Variation strength"): image i also draws noise from
  a fresh generator seeded with ``subseed + i`` and the two are blended with :func:`slerp`.
- A negative seed means "pick one at random"; :func:`resolve_seed` picks it so it can be
  recorded in the image's metadata and the image reproduced.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from malerei.engine.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

# Largest seed accepted: torch generators take 64-bit seeds, JSON/SQL integers are signed 64-bit.
SEED_MAX = 2**63 - 1
# Random seeds are drawn below this bound, like A1111 (values users can type and read back).
RANDOM_SEED_BOUND = 2**32 - 1


def resolve_seed(seed: int) -> int:
    """Return ``seed`` itself, or a fresh random seed when ``seed`` is negative (-1: random)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidParameter(f"seed must be an integer, got {seed!r}")
    if seed < 0:
        return secrets.randbelow(RANDOM_SEED_BOUND)
    if seed > SEED_MAX:
        raise InvalidParameter(f"seed {seed} is too large; allowed: 0..{SEED_MAX}, or -1 for random")
    return seed


def batch_seeds(seed: int, count: int) -> list[int]:
    """Seeds of a batch: ``seed, seed+1, ..., seed+count-1`` (``seed`` must be resolved)."""
    if seed < 0:
        raise InvalidParameter("batch_seeds needs a resolved seed; call resolve_seed first")
    if seed + count - 1 > SEED_MAX:
        raise InvalidParameter(f"seed {seed} plus a batch of {count} passes the largest seed {SEED_MAX}")
    return [seed + i for i in range(count)]


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (val=0) to ``high`` (val=1), A1111's way.

    A1111 (``modules/rng.py``, ``slerp``) calls this on one image's noise of shape ``(C, H, W)``
    and normalises along dim 1, so each (channel, column) vector of H values is interpolated on
    its own great circle; this function keeps that convention so a variation seed gives the
    same blend. Where the two inputs are almost parallel (mean cosine > 0.9995) it falls back to
    a linear blend: A1111 swaps the weights there, a branch that independent Gaussian draws
    never reach, so the ordinary lerp here agrees with it wherever it matters.
    """
    import torch

    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * (1.0 - val) + high * val
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    weight_low = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    weight_high = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return weight_low * low + weight_high * high


class ImageNoise:
    """The random streams of one job: one generator per image, plus optional variation seeds.

    Build one per ``generate`` call (never share between jobs): :meth:`initial` draws each
    image's starting noise, then :meth:`randn_like` / :attr:`generators` give the samplers
    their per-step noise from the same streams.
    """

    def __init__(
        self,
        *,
        seeds: Sequence[int],
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        device: str = "cpu",
    ) -> None:
        import torch

        if not seeds:
            raise InvalidParameter("at least one seed is needed")
        if not 0.0 <= subseed_strength <= 1.0:
            raise InvalidParameter(f"variation strength must be within 0..1, got {subseed_strength}")
        if subseed_strength > 0 and (subseeds is None or len(subseeds) != len(seeds)):
            raise InvalidParameter("a variation strength above 0 needs one variation seed per image")
        self.seeds = list(seeds)
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength = float(subseed_strength)
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in self.seeds]

    @classmethod
    def for_batch(
        cls,
        seed: int,
        batch_size: int,
        *,
        subseed: int | None = None,
        subseed_strength: float = 0.0,
        device: str = "cpu",
    ) -> ImageNoise:
        """Noise for a batch from resolved seeds: ``seed+i`` and ``subseed+i`` for image i."""
        seeds = batch_seeds(seed, batch_size)
        subseeds = batch_seeds(subseed, batch_size) if subseed is not None and subseed_strength > 0 else None
        return cls(seeds=seeds, subseeds=subseeds, subseed_strength=subseed_strength, device=device)

    def __len__(self) -> int:
        return len(self.seeds)

    def initial(self, shape: Sequence[int], *, device=None, dtype=None) -> torch.Tensor:
        """Starting noise of shape ``(N, *shape)``: each image's first draw of ``(1, *shape)``.

        With a variation strength above 0 the image's noise is slerped toward the noise of its
        variation seed (drawn from a separate generator, so the image's own stream goes on as
        without a variation seed).
        """
        import torch

        one = (1, *shape)
        rows = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(one, generator=generator, device=self.device, dtype=torch.float32)
            if self.subseeds is not None and self.subseed_strength > 0:
                sub_gen = torch.Generator(self.device).manual_seed(int(self.subseeds[i]))
                subnoise = torch.randn(one, generator=sub_gen, device=self.device, dtype=torch.float32)
                noise = slerp(self.subseed_strength, noise[0], subnoise[0]).unsqueeze(0)
            rows.append(noise)
        latents = rows[0] if len(rows) == 1 else torch.cat(rows)
        return latents.to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step noise shaped like ``x`` (batch first): row i from image i's generator."""
        import torch

        if x.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {x.shape[0]} asked from {len(self.generators)} generators")
        one = (1, *x.shape[1:])
        rows = [torch.randn(one, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        noise = rows[0] if len(rows) == 1 else torch.cat(rows)
        return noise.to(device=x.device, dtype=x.dtype)

    def noise_sampler(self, x: torch.Tensor):
        """A k-diffusion style ``noise_sampler(sigma, sigma_next)`` drawing from these streams."""

        def sample(sigma=None, sigma_next=None):  # noqa: ARG001 - k-diffusion signature
            return self.randn_like(x)

        return sample

    @property
    def scheduler_generator(self):
        """What to pass as ``generator=`` to a diffusers scheduler's ``step``.

        A single generator for one image (exactly what a diffusers pipeline passes), else the
        list, from which ``randn_tensor`` draws image i's noise with generator i.
        """
        return self.generators[0] if len(self.generators) == 1 else list(self.generators)
