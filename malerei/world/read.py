"""Read an image back into shapes-world attributes, by SHAPES.md's evaluator rules exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from malerei.world.scene import Scene
from malerei.world.vocab import PALETTE

_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

OBJECT_DISTANCE = 60.0  # RGB distance from the background's median that makes a pixel an object's
MIN_COMPONENT = 12  # two-object reading: smaller components do not count (px at 64)


@dataclass(frozen=True)
class ObjectReading:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    pixels: int


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[ObjectReading, ...]  # largest first


def nearest_colour(rgb: np.ndarray) -> str:
    d = ((_PALETTE_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(np.argmin(d))]


def _read_object(image: np.ndarray, mask: np.ndarray, scale: float) -> ObjectReading:
    ys, xs = np.nonzero(mask)
    colour = nearest_colour(np.median(image[ys, xs].astype(np.float64), axis=0))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    size = "large" if (w > 15 * scale or h > 15 * scale) else "small"
    fill = len(ys) / float(w * h)
    shape = "square" if fill >= 0.88 else ("circle" if fill >= 0.64 else "triangle")
    # Centroid of pixel centres, in cells of a 3x3 grid.
    cell_px = image.shape[0] / 3
    cell = (min(int((xs.mean() + 0.5) // cell_px), 2), min(int((ys.mean() + 0.5) // cell_px), 2))
    return ObjectReading(colour=colour, shape=shape, size=size, cell=cell, pixels=len(ys))


def background_and_object_pixels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SHAPES.md's steps 1 and 2 for one image [H, W, 3] or a batch [N, H, W, 3]: the median RGB
    of the outer 3-pixel border, and the mask of pixels farther than 60 from it."""
    images = np.asarray(images)[..., :3].astype(np.float64)
    lead = images.shape[:-3]
    border = np.concatenate(
        [images[..., :3, :, :].reshape(*lead, -1, 3), images[..., -3:, :, :].reshape(*lead, -1, 3),
         images[..., 3:-3, :3, :].reshape(*lead, -1, 3), images[..., 3:-3, -3:, :].reshape(*lead, -1, 3)], axis=-2
    )
    bg_median = np.median(border, axis=-2)
    distance = np.sqrt(((images - bg_median[..., None, None, :]) ** 2).sum(axis=-1))
    return bg_median, distance > OBJECT_DISTANCE


def read_image(image: np.ndarray, *, max_objects: int = 2) -> Reading:
    """Read background and up to `max_objects` largest 8-connected components (largest first)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError("expected an RGB image array [H, W, 3]")
    image = image[..., :3]
    scale = image.shape[0] / 64
    bg_median, object_pixels = background_and_object_pixels(image)
    background = nearest_colour(bg_median)
    labels, n = ndimage.label(object_pixels, structure=_EIGHT_CONNECTED)
    if n == 0:
        return Reading(background=background, objects=())
    counts = np.bincount(labels.ravel())[1:]
    order = np.argsort(-counts, kind="stable")[:max_objects]
    objects = tuple(_read_object(image, labels == (i + 1), scale) for i in order)
    return Reading(background=background, objects=objects)


@dataclass(frozen=True)
class Judgement:
    """What a reading says about one caption: per-attribute matches and overall adherence."""

    attributes: dict[str, bool]  # background, colour, shape, size, position (one object)
    adheres: bool


def judge(scene: Scene, image: np.ndarray) -> Judgement:
    """Compare an image with the fully specified caption of `scene` by SHAPES.md's rules."""
    reading = read_image(image)
    bg_ok = reading.background == scene.background
    if len(scene.objects) == 1:
        want = scene.objects[0]
        if not reading.objects:
            attrs = {"background": bg_ok, "colour": False, "shape": False, "size": False, "position": False}
        else:
            got = reading.objects[0]
            attrs = {
                "background": bg_ok,
                "colour": got.colour == want.colour,
                "shape": got.shape == want.shape,
                "size": got.size == want.size,
                "position": got.cell == want.cell,
            }
        return Judgement(attributes=attrs, adheres=all(attrs.values()))
    # Two objects: the two largest components of at least MIN_COMPONENT px (scaled by area),
    # each paired with the caption object named for its cell.
    min_px = MIN_COMPONENT * (image.shape[0] / 64) ** 2
    found = [o for o in reading.objects if o.pixels >= min_px]
    by_cell = {o.cell: o for o in scene.objects}
    objects_ok = []
    for got in found[:2]:
        want = by_cell.get(got.cell)
        objects_ok.append(
            want is not None and got.colour == want.colour and got.shape == want.shape and got.size == want.size
        )
    cells_ok = len(found) >= 2 and {o.cell for o in found[:2]} == set(by_cell)
    attrs = {"background": bg_ok, "objects": len(objects_ok) == 2 and all(objects_ok) and cells_ok}
    return Judgement(attributes=attrs, adheres=all(attrs.values()))
