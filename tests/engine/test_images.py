"""Input images: format by content, pixel caps before decoding, corrupt files, masks, resize modes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from malerei.engine import images
from malerei.engine.errors import ImageError, InvalidParameter


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny (wrong) IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_formats_are_recognised_by_content_not_name(tmp_path, fmt):
    source = Image.new("RGB", (24, 16), (200, 30, 40))
    path = tmp_path / "picture.gif"  # a misleading name
    path.write_bytes(_bytes(source, fmt))
    image = images.read_image(path)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert np.abs(np.asarray(image).astype(int) - (200, 30, 40)).max() < 12
    assert images.sniff(path.read_bytes()) == fmt


def test_alpha_is_kept_and_other_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 100))
    assert images.read_image(_bytes(rgba, "PNG")).mode == "RGBA"
    grey = Image.new("L", (8, 8), 77)
    out = images.read_image(_bytes(grey, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert images.read_image(_bytes(palette, "PNG", transparency=0)).mode == "RGBA"


@pytest.mark.parametrize("data, words", [
    (b"GIF89a" + b"\0" * 40, "unsupported file"),
    (_bytes(Image.new("RGB", (4, 4)), "BMP"), "unsupported file"),
    (b"hello, not an image", "unsupported file"),
    (_bytes(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60], "corrupt"),
    (_bytes(Image.new("RGB", (64, 64)), "JPEG")[:40], "corrupt"),
])
def test_unreadable_input_is_one_line_image_error(data, words):
    with pytest.raises(ImageError) as info:
        images.read_image(data, what="image")
    message = str(info.value)
    assert words in message and "\n" not in message


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        images.read_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        images.read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="folder"):
        images.read_image(tmp_path)


def test_bomb_is_refused_from_the_header_before_any_decoding(monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="too large"):
        images.read_image(_png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="too large"):  # below Pillow's own limit, above ours
        images.read_image(_png_header_only(200, 100), max_pixels=10_000)
    # Past Pillow's MAX_IMAGE_PIXELS * 2 Pillow itself refuses in open(): the same error.
    with pytest.raises(ImageError, match="pixels"):
        images.read_image(_png_header_only(60000, 60000), max_pixels=10**10)


def test_byte_cap(tmp_path):
    data = _bytes(Image.new("RGB", (32, 32)), "PNG")
    with pytest.raises(ImageError, match="at most 10 are allowed"):
        images.read_image(data, max_bytes=10)


# ---------------------------------------------------------------------------------------------
# masks


def test_read_mask_checks_size_and_composites_alpha(tmp_path):
    mask = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (4, 4, 8, 8))
    path = tmp_path / "mask.png"
    mask.save(path)
    out = images.read_mask(path, size=(16, 16))
    assert out.mode == "L" and out.getpixel((5, 5)) == 255 and out.getpixel((0, 0)) == 0
    with pytest.raises(ImageError, match="mask is 16x16 but the image is 20x16"):
        images.read_mask(path, size=(20, 16))


def test_mask_from_alpha():
    image = Image.new("RGBA", (10, 10), (5, 5, 5, 255))
    image.putpixel((3, 3), (5, 5, 5, 0))
    mask = images.mask_from_alpha(image)
    assert mask.getpixel((3, 3)) == 255 and mask.getpixel((0, 0)) == 0
    with pytest.raises(ImageError, match="no alpha channel"):
        images.mask_from_alpha(Image.new("RGB", (4, 4)))
    with pytest.raises(ImageError, match="fully opaque"):
        images.mask_from_alpha(Image.new("RGBA", (4, 4), (0, 0, 0, 255)))
    with pytest.raises(ImageError, match="all black"):
        images.check_mask_not_empty(Image.new("L", (4, 4), 0))


def test_blur_spreads_only_near_the_edge():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    blurred = np.asarray(images.blur_mask(mask, 2))
    assert blurred[32, 32] == 255 and blurred[0, 0] == 0 and 0 < blurred[32, 23] < 255
    assert images.blur_mask(mask, 0) is mask
    with pytest.raises(InvalidParameter):
        images.blur_mask(mask, -1)


def test_crop_region_pads_keeps_aspect_and_stays_inside():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (90, 40, 110, 50))
    x1, y1, x2, y2 = images.crop_region(mask, padding=10, aspect=1.0)
    assert x1 <= 80 and y1 <= 30 and x2 >= 120 and y2 >= 60  # box + padding inside
    assert (x2 - x1) == (y2 - y1)  # square, as asked
    wide = images.crop_region(mask, padding=0, aspect=4.0)
    assert abs((wide[2] - wide[0]) / (wide[3] - wide[1]) - 4.0) < 0.1
    corner = Image.new("L", (100, 100), 0)
    corner.paste(255, (0, 0, 5, 5))
    box = images.crop_region(corner, padding=50, aspect=2.0)
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= 100 and box[3] <= 100


def test_fill_masked_paints_the_hole_with_the_colours_around_it():
    image = Image.new("RGB", (40, 40), (200, 20, 20))
    image.paste((20, 20, 200), (20, 0, 40, 40))  # left red, right blue
    image.paste((0, 255, 0), (15, 15, 25, 25))  # a green square to hide
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (15, 15, 25, 25))
    filled = np.asarray(images.fill_masked(image, mask)).astype(int)
    assert filled[20, 16, 1] < 60  # no green left
    assert filled[20, 16, 0] > filled[20, 16, 2]  # the left side of the hole leans red
    assert filled[20, 24, 2] > filled[20, 24, 0]  # the right side leans blue
    assert np.array_equal(filled[:10], np.asarray(image)[:10])  # outside the mask: unchanged


# ---------------------------------------------------------------------------------------------
# resize modes


def _halves(w: int, h: int) -> Image.Image:
    image = Image.new("RGB", (w, h), (255, 0, 0))
    image.paste((0, 0, 255), (w // 2, 0, w, h))
    return image


def test_resize_modes():
    source = _halves(80, 40)  # 2:1, red | blue
    just = images.resize_image(source, 32, 32, "just resize")
    assert just.size == (32, 32) and just.getpixel((2, 16))[0] > 200 and just.getpixel((30, 16))[2] > 200
    crop = images.resize_image(source, 32, 32, "crop and resize")
    assert crop.size == (32, 32)
    # Cropping the centre square of a 2:1 image keeps half of each colour, the edges are the middle's.
    assert crop.getpixel((2, 16))[0] > 200 and crop.getpixel((30, 16))[2] > 200
    fill = images.resize_image(source, 32, 32, "resize and fill")
    arr = np.asarray(fill).astype(int)
    assert fill.size == (32, 32)
    # Fitted inside: 32x16 in the middle, the bands above and below stretched from the edge rows.
    assert np.abs(arr[0] - arr[8]).max() <= 2 and np.abs(arr[31] - arr[23]).max() <= 2
    with pytest.raises(InvalidParameter, match="allowed: just resize"):
        images.resize_image(source, 32, 32, "stretch")


def test_tensor_round_trip():
    source = _halves(16, 8)
    x = images.to_tensor(source)
    assert x.shape == (1, 3, 8, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(np.asarray(images.from_tensor(x)[0]), np.asarray(source))
    y = images.to_tensor([source, source], low=0.0)
    assert y.shape[0] == 2 and y.min() == 0
