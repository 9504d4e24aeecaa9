"""Decoding images that clients send, safely.

Only PNG, JPEG and WebP are decoded, recognised by their first bytes (never by name or declared
type). The size in the header is checked before any pixel is decoded, so a decompression bomb
(a small file that claims 20000x20000 pixels) is refused at once without the memory to decode it.
Anything Pillow cannot decode answers 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct

from PIL import Image, UnidentifiedImageError

from malerei.serve.errors import ApiError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image") -> Image.Image:
    """A fully loaded RGB/RGBA/L image, or an :class:`ApiError` (413, 415 or 400)."""
    if len(data) > max_bytes:
        raise ApiError(413, "upload_too_large", f"{what} is {len(data)} bytes; at most {max_bytes} are allowed")
    if not data:
        raise ApiError(400, "invalid_image", f"{what} is empty")
    fmt = sniff(data)
    if fmt is None:
        raise ApiError(415, "unsupported_image_format",
                       f"{what} is not a PNG, JPEG or WebP file (recognised by content); other formats are refused")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise ApiError(413, "image_too_large",
                           f"{what} is {width}x{height} pixels; at most {max_pixels} pixels are allowed")
        image.seek(0)
        image.load()
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"{what} claims more pixels than allowed (at most {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            struct.error, EOFError, MemoryError, IndexError) as exc:
        raise ApiError(400, "invalid_image", f"{what} could not be decoded as {fmt}: {exc}") from None
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    out = image.copy()
    out.info = {}
    return out


def decode_b64(value: str, *, max_bytes: int, what: str = "image") -> bytes:
    """Bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    if len(value) * 3 // 4 > max_bytes + 3:
        raise ApiError(413, "upload_too_large", f"{what} is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"{what} is not valid base64") from None


def encode_b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
