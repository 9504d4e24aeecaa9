"""Face and image restoration (the GFP-GAN family) on top of :mod:`malerei.engine.upscale`.

    restorer = load_restorer("GFPGANv1.4", models_dir=...)   # GFPGAN, CodeFormer, RestoreFormer, ...
    restorer = load_restorer(None)                          # the built-in shapes-world restorer
    fixed = restore_image(restorer, image, strength=0.8)

See :mod:`malerei.restore.restorer`.
"""

from malerei.restore.restorer import RESTORER_DIRS, load_restorer, restore_image

__all__ = ["RESTORER_DIRS", "load_restorer", "restore_image"]
