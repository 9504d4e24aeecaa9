"""Restoration: a spandrel "FaceSR" or "Restoration" model applied to an image, blended by strength.

- Face models (GFPGAN, CodeFormer, RestoreFormer: fixed 512 x 512 input) see the whole image
  resized to 512 x 512, and their output is resized back. malerei has no face detector (it would
  need weights from a hub), so these models suit images that are mostly one face; A1111 crops
  detected faces first.
- Restoration models (scale 1: the built-in shapes-world restorer, SCUNet, DRUNet, FBCNN,
  Compact x1, ...) run at the image's own size, in overlapping tiles.

``strength`` is A1111's "visibility": 0 gives the input back, 1 the model's output, values in
between mix them pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from malerei.engine.errors import InvalidParameter
from malerei.engine.upscale import (
    BUILTIN_RESTORER,
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    RESTORE_PURPOSES,
    RESTORER_DIRS,
    Upscaler,
    apply_model,
    load_spandrel,
    resolve_file,
)

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["RESTORER_DIRS", "check_strength", "load_restorer", "restore_image"]


def load_restorer(ref: str | Path | None = None, *, models_dir: Path | None = None, allow_pickle: bool = False,
                  device: str | None = None) -> Upscaler:
    """A restoration model by name (GFPGAN/, Codeformer/, ... of the models folder), path, or None
    (the built-in shapes-world restorer)."""
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    path = resolve_file(ref, models_dir=models_dir, subdirs=RESTORER_DIRS, builtin=BUILTIN_RESTORER,
                        what="restorer")
    return load_spandrel(path, allow_pickle=allow_pickle, device=device, purposes=RESTORE_PURPOSES,
                         what="restorer", name="shapes-restore" if ref is None else None)


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength:
        raise InvalidParameter(f"restore strength must be a number, got {strength!r}")
    if not 0.0 <= strength <= 1.0:
        raise InvalidParameter(f"restore strength {strength:g} is out of range; allowed: 0..1")
    return float(strength)


def restore_image(restorer: Upscaler, image: PIL.Image.Image, *, strength: float = 1.0, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP) -> PIL.Image.Image:
    """``image`` restored by ``restorer``, mixed with the input by ``strength`` (same size as the input)."""
    from PIL import Image

    from malerei.engine import images

    strength = check_strength(strength)
    source = images.to_rgb(image)
    if strength == 0.0:
        return source.copy()
    side = restorer.square_input
    if side is not None:
        square = source.resize((side, side), Image.Resampling.LANCZOS)
        restored = apply_model(restorer, square, tile=max(side, tile), overlap=0)
        restored = restored.resize(source.size, Image.Resampling.LANCZOS)
    else:
        restored = apply_model(restorer, source, tile=tile, overlap=overlap)
        if restored.size != source.size:  # a scale > 1 restoration model: back to the input's size
            restored = restored.resize(source.size, Image.Resampling.LANCZOS)
    return restored if strength == 1.0 else Image.blend(source, restored, strength)
