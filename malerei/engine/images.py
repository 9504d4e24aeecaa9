"""Input images, safely: reading, masks, resizing, and the conversions the image jobs need.

Every image a user hands malerei (img2img source, inpainting mask, upscale/restore input, grid
init image) goes through :func:`read_image` / :func:`read_mask`:

- The format is recognised by the first bytes (PNG, JPEG, WebP), never by the file name.
- The pixel count in the header is checked against ``max_pixels`` BEFORE any pixel is decoded,
  so a decompression bomb (a small file claiming 50000 x 50000 pixels) costs nothing; Pillow's
  own ``MAX_IMAGE_PIXELS`` guard is turned into the same error.
- Anything that cannot be decoded (corrupt, truncated, not an image) raises
  :class:`~malerei.engine.errors.ImageError` with one line saying which file and why.

The result is fully loaded, detached from the file, in mode ``RGB`` or ``RGBA`` (alpha kept:
inpainting can take its mask from it).

Resize modes are A1111's img2img modes: "just resize" (stretch), "crop and resize" (fill the
target, cut the overflow, centred) and "resize and fill" (fit inside, fill the rest by
stretching the image's edge rows/columns outward).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from malerei.engine.errors import ImageError, InvalidParameter

if TYPE_CHECKING:
    import PIL.Image
    import torch

MAX_PIXELS = 4096 * 4096  # the engine's largest canvas (pipeline.MAX_SIDE squared)
MAX_BYTES = 64 * 1024 * 1024
FORMATS = ("PNG", "JPEG", "WEBP")
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes: "PNG", "JPEG", "WEBP" or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _read_bytes(source, what: str, max_bytes: int) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = what
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"{what} {path}"
        try:
            size = path.stat().st_size
            if path.is_dir():
                raise ImageError(f"{name}: is a folder, not an image file")
            if size > max_bytes:
                raise ImageError(f"{name}: the file is {size} bytes; at most {max_bytes} are allowed")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except PermissionError:
            raise ImageError(f"{name}: permission denied") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    else:
        raise ImageError(f"cannot read {what} from a {type(source).__name__}; give a path or bytes")
    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes; at most {max_bytes} are allowed")
    if not data:
        raise ImageError(f"{name}: the file is empty")
    return name, data


def read_image(source, *, what: str = "image", max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> PIL.Image.Image:
    """A fully decoded ``RGB`` or ``RGBA`` image from a path or bytes, or :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    name, data = _read_bytes(source, what, max_bytes)
    fmt = sniff(data)
    if fmt is None:
        raise ImageError(f"{name}: unsupported file: not a PNG, JPEG or WebP image (recognised by content)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            width, height = image.size
            # The header's size, before decoding a single pixel.
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} pixels is too large; at most {max_pixels} pixels "
                                 "are allowed")
            image.seek(0)
            image.load()
            if image.mode in ("RGB", "RGBA"):
                out = image.copy()
            elif "A" in image.mode or "transparency" in image.info:
                out = image.convert("RGBA")
            elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
                out = image.convert("I").point(lambda v: v / 257).convert("L").convert("RGB")
            else:
                out = image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: the image is too large: it claims more pixels than allowed (at most {max_pixels})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: the file is corrupt: not a readable {fmt} image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
            MemoryError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"{name}: the file is corrupt or truncated ({detail})") from None
    out.info = {}
    return out


def has_alpha(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB of an RGB/RGBA image (alpha dropped, colours kept, as A1111 does for init images)."""
    return image if image.mode == "RGB" else image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Masks: white (255) = change, black (0) = keep


def read_mask(source, *, size: tuple[int, int], what: str = "mask", max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """A black/white mask image as mode ``L`` (white: paint here). Its size must equal ``size``.

    A mask with an alpha channel counts its transparent pixels as black (A1111 masks drawn on a
    transparent layer).
    """
    image = read_image(source, what=what, max_pixels=max_pixels)
    if image.size != tuple(size):
        raise ImageError(f"{what} is {image.size[0]}x{image.size[1]} but the image is {size[0]}x{size[1]}; "
                         "the mask must be the same size as the image")
    if image.mode == "RGBA":
        from PIL import Image

        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image)
    return image.convert("L")


def mask_from_alpha(image: PIL.Image.Image) -> PIL.Image.Image:
    """The inpainting mask of an image with transparency: transparent pixels are repainted."""
    from PIL import ImageOps

    if not has_alpha(image):
        raise ImageError("the image has no alpha channel to take the mask from; give --mask MASK "
                         "(a black/white PNG, white = repaint) or an image with transparent pixels")
    alpha = image.convert("RGBA").getchannel("A")
    mask = ImageOps.invert(alpha)
    if mask.getbbox() is None:
        raise ImageError("the image's alpha channel is fully opaque: nothing to repaint; make the area to "
                         "repaint transparent or give --mask MASK")
    return mask


def check_mask_not_empty(mask: PIL.Image.Image) -> None:
    if mask.getbbox() is None:
        raise ImageError("the mask is all black: nothing to repaint; paint the area to change white")


def blur_mask(mask: PIL.Image.Image, radius: float) -> PIL.Image.Image:
    """A1111's "mask blur": a Gaussian blur of the mask (radius = standard deviation, px)."""
    from PIL import ImageFilter

    if radius < 0:
        raise InvalidParameter(f"mask blur {radius} is out of range; allowed: 0..64")
    return mask if radius == 0 else mask.filter(ImageFilter.GaussianBlur(radius))


def mask_bbox(mask: PIL.Image.Image, threshold: int = 0) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels above ``threshold``; None when there are none."""
    return mask.point(lambda v: 255 if v > threshold else 0).getbbox()


def crop_region(mask: PIL.Image.Image, *, padding: int, aspect: float) -> tuple[int, int, int, int]:
    """A1111's "only masked" region: the mask's bounding box plus ``padding`` on each side, grown
    to the processing aspect ratio ``aspect`` (width / height), kept inside the image."""
    box = mask_bbox(mask)
    if box is None:
        raise ImageError("the mask is all black: nothing to repaint; paint the area to change white")
    W, H = mask.size
    x1, y1, x2, y2 = box
    x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, W), min(y2 + padding, H)
    w, h = x2 - x1, y2 - y1
    if w / h < aspect:  # too tall: widen
        want = min(round(h * aspect), W)
        x1, x2 = _grow(x1, x2, want, W)
        w = x2 - x1
        if w / h < aspect - 1e-9:  # hit the image's width: shorten instead
            y1, y2 = _shrink_around(y1, y2, max(round(w / aspect), 1), box[1], box[3])
    elif w / h > aspect:
        want = min(round(w / aspect), H)
        y1, y2 = _grow(y1, y2, want, H)
        h = y2 - y1
        if w / h > aspect + 1e-9:
            x1, x2 = _shrink_around(x1, x2, max(round(h * aspect), 1), box[0], box[2])
    return x1, y1, x2, y2


def _grow(a: int, b: int, want: int, limit: int) -> tuple[int, int]:
    extra = want - (b - a)
    a -= extra // 2
    b += extra - extra // 2
    if a < 0:
        b, a = b - a, 0
    if b > limit:
        a, b = max(a - (b - limit), 0), limit
    return a, b


def _shrink_around(a: int, b: int, want: int, keep_a: int, keep_b: int) -> tuple[int, int]:
    """Shorten [a, b) to ``want`` keeping [keep_a, keep_b) inside if it fits (else its centre)."""
    if want >= b - a:
        return a, b
    centre = (keep_a + keep_b) / 2
    start = int(round(centre - want / 2))
    start = min(max(start, a), b - want)
    return start, start + want


def fill_masked(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """A1111's "fill" masked content: the masked area painted with the colours around it.

    Normalised convolution: blur the kept pixels and the keep-mask with shrinking radii and
    divide, so every masked pixel takes a smooth average of the nearest kept colours.
    """
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rgb = np.asarray(to_rgb(image), dtype=np.float64)
    keep = (np.asarray(mask.convert("L")) < 128).astype(np.float64)
    if not keep.any():
        mean = rgb.reshape(-1, 3).mean(axis=0)
        return Image.fromarray(np.broadcast_to(mean, rgb.shape).round().astype(np.uint8))
    out = rgb.copy()
    reached = keep > 0.5
    for radius in (64, 32, 16, 8, 4, 2, 1):
        den = gaussian_filter(keep, radius, mode="nearest")
        ok = (den > 1e-4) & (keep < 0.5)
        if not ok.any():
            continue
        num = np.stack([gaussian_filter(rgb[..., c] * keep, radius, mode="nearest") for c in range(3)], axis=-1)
        # Finer radii overwrite coarser estimates wherever they reach.
        out[ok] = num[ok] / den[ok][:, None]
        reached |= ok
    if not reached.all():
        out[~reached] = rgb[keep > 0.5].mean(axis=0)
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Resizing


def check_resize_mode(mode: str) -> str:
    name = str(mode).strip().lower()
    if name not in RESIZE_MODES:
        raise InvalidParameter(f"unknown resize mode {mode!r}; allowed: {', '.join(RESIZE_MODES)}")
    return name


def resize_image(image: PIL.Image.Image, width: int, height: int, mode: str = "just resize") -> PIL.Image.Image:
    """``image`` at ``width`` x ``height`` by A1111's resize mode (see the module docstring)."""
    from PIL import Image

    mode = check_resize_mode(mode)
    if image.size == (width, height):
        return image.copy()
    lanczos = Image.Resampling.LANCZOS
    if mode == "just resize":
        return image.resize((width, height), lanczos)
    w, h = image.size
    if mode == "crop and resize":
        ratio = max(width / w, height / h)
        sw, sh = max(round(w * ratio), width), max(round(h * ratio), height)
        scaled = image.resize((sw, sh), lanczos)
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    ratio = min(width / w, height / h)
    sw, sh = max(min(round(w * ratio), width), 1), max(min(round(h * ratio), height), 1)
    scaled = image.resize((sw, sh), lanczos)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - sw) // 2, (height - sh) // 2
    canvas.paste(scaled, (left, top))
    # Stretch the edge rows / columns into the empty bands.
    if top > 0:
        canvas.paste(scaled.crop((0, 0, sw, 1)).resize((sw, top)), (left, 0))
    if height - top - sh > 0:
        canvas.paste(scaled.crop((0, sh - 1, sw, sh)).resize((sw, height - top - sh)), (left, top + sh))
    if left > 0:
        canvas.paste(canvas.crop((left, 0, left + 1, height)).resize((left, height)), (0, 0))
    if width - left - sw > 0:
        canvas.paste(canvas.crop((left + sw - 1, 0, left + sw, height)).resize((width - left - sw, height)),
                     (left + sw, 0))
    return canvas


def round_size(width: int, height: int, multiple: int = 8, *, low: int = 16) -> tuple[int, int]:
    """A size to process an image of ``width`` x ``height`` at: the nearest multiples of ``multiple``."""
    def one(v: int) -> int:
        return max(low, int(round(v / multiple)) * multiple)

    return one(width), one(height)


# ---------------------------------------------------------------------------------------------
# Tensors


def to_tensor(images, *, low: float = -1.0) -> torch.Tensor:
    """PIL image(s) -> float tensor [N, 3, H, W] in [low, 1] (``low`` -1: the VAE's range; 0: spandrel's)."""
    import numpy as np
    import torch

    if not isinstance(images, (list, tuple)):
        images = [images]
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x * (1.0 - low) + low


def from_tensor(x: torch.Tensor, *, low: float = -1.0) -> list[PIL.Image.Image]:
    """float tensor [N, 3, H, W] in [low, 1] -> 8-bit RGB PIL images (rounded)."""
    import torch
    from PIL import Image

    pixels = ((x.detach().float().cpu() - low) / (1.0 - low)).clamp(0, 1)
    arr = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def mask_to_tensor(mask: PIL.Image.Image) -> torch.Tensor:
    """An ``L`` mask -> float tensor [1, 1, H, W] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def composite(original: PIL.Image.Image, generated: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """original where the mask is 0, generated where it is 255, mixed in between (A1111's overlay)."""
    from PIL import Image

    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    return Image.composite(to_rgb(generated), to_rgb(original), mask.convert("L"))
