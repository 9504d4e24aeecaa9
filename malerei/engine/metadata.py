"""Image metadata: AUTOMATIC1111's ``parameters`` infotext and malerei's JSON recipe.

The infotext is the text A1111 stores in a PNG ``parameters`` chunk (and in the EXIF UserComment
of JPEG/WebP files)::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, ...

:func:`format_infotext` writes it the way A1111's ``create_infotext`` does (key order, number
printing, quoting) and :func:`parse_infotext` reads it the way ``parse_generation_parameters``
does, so malerei images paste into A1111 and A1111 images paste into malerei. The ``malerei``
chunk holds the full recipe as JSON (:func:`build_recipe`): everything needed to regenerate the
image, including model file hashes and library versions.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from malerei.engine.errors import ImageError, InvalidParameter

PARAMETERS_KEY = "parameters"  # A1111's PNG text key
RECIPE_KEY = "malerei"  # malerei's PNG text key (JSON)
RECIPE_FORMAT = "malerei-recipe"
RECIPE_FORMAT_VERSION = 1

# A1111 create_infotext (v1.10): the fixed keys, in order ...
_FIXED_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
)
# ... then extra_generation_params in the order txt2img's hires fix, LoRA activation and the
# prompt encoder add them; any other key follows in the caller's order ...
_EXTRA_ORDER = (
    "Hires checkpoint",
    "Hires sampler",
    "Hires prompt",
    "Hires negative prompt",
    "Hires schedule type",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Lora hashes",
    "TI hashes",
    "Emphasis",
)
# ... and these close the line.
_TAIL_ORDER = ("Version", "User")

# A1111 infotext_utils: one "Key: value" pair; a value is JSON-quoted or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_KEY = re.compile(r"^\w[\w \-/]+$")
_NEGATIVE_PREFIX = "Negative prompt:"


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def malerei_version() -> str:
    """malerei's version: installed package metadata, else the checkout's pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("malerei")
    except metadata.PackageNotFoundError:
        pass
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        with pyproject.open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of malerei and the libraries that decide what an image looks like."""
    from importlib import metadata

    versions = {"malerei": malerei_version()}
    for name in ("torch", "diffusers", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --------------------------------------------------------------------------------------------
# Infotext: format
# --------------------------------------------------------------------------------------------


def quote(value: Any) -> str:
    """A1111's quoting: JSON-quote a value holding ``,`` ``:`` or a newline.

    malerei also quotes values holding ``"`` so that a value which starts and ends with a quote
    still reads back unchanged (A1111 would unquote it).
    """
    text = format_value(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_value(value: Any) -> str:
    """A value as A1111 prints it: ``7`` not ``7.0``, ``7.5``, ``True``, ``512x768`` for a size."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidParameter(f"infotext values must be finite numbers, got {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, Mapping):  # {"name": "hash"} -> "name: hash, name2: hash2"
        return format_hashes(value)
    return str(value)


def format_hashes(hashes: Mapping[str, str]) -> str:
    """A1111's "Lora hashes" / "TI hashes" value; names lose ``:`` and ``,`` as in A1111."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items())


def _is_zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def format_infotext(*, prompt: str, negative_prompt: str = "", params: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text for one image.

    ``params`` uses A1111's labels: ``Steps``, ``Sampler``, ``Schedule type``, ``CFG scale``,
    ``Seed``, ``Size`` (``(w, h)`` or ``"WxH"``), ``Model hash``, ``Model``, ``Variation seed``,
    ``Variation seed strength``, ``Denoising strength``, ``Clip skip``, ``Hires upscale``,
    ``Hires steps``, ``Hires upscaler``, ``Lora hashes`` / ``TI hashes`` (a ``{name: hash}``
    mapping or the ready string), ... Keys come out in A1111's order, unknown keys after A1111's
    extras in the given order. ``None`` values are left out, as are the variation seed when its
    strength is 0 and ``Clip skip`` when it is 1. ``Version`` defaults to ``malerei <version>``
    (pass ``"Version": None`` to leave it out).
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise InvalidParameter("prompt and negative prompt must be strings")
    values = dict(params)
    for key in values:
        if not isinstance(key, str) or not _KEY.match(key) or key in ("Prompt", "Negative prompt"):
            raise InvalidParameter(
                f"infotext key {key!r} is not allowed; keys are words, spaces, '-' and '/'"
            )
    values.setdefault("Version", f"malerei {malerei_version()}")

    if _is_zero(values.get("Variation seed strength")):
        values["Variation seed"] = values["Variation seed strength"] = None
    clip_skip = values.get("Clip skip")
    if clip_skip is not None:
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
            raise InvalidParameter(f"Clip skip must be an integer, got {clip_skip!r}")
        if clip_skip <= 1:
            values["Clip skip"] = None

    ordered = [k for k in _FIXED_ORDER + _EXTRA_ORDER if k in values]
    ordered += [k for k in values if k not in ordered and k not in _TAIL_ORDER]
    ordered += [k for k in _TAIL_ORDER if k in values]

    parts = []
    for key in ordered:
        value = values[key]
        if value is None:
            continue
        text = format_value(value)
        parts.append(key if text == key else f"{key}: {quote(value)}")

    negative = f"\n{_NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


# --------------------------------------------------------------------------------------------
# Infotext: parse
# --------------------------------------------------------------------------------------------


def unquote(text: str) -> str:
    """Inverse of :func:`quote` for a JSON-quoted value; anything else is returned as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def parse_infotext(text: str) -> dict[str, str]:
    """Read an A1111 infotext into ``{"Prompt", "Negative prompt", key: value, ...}``.

    Works like A1111's ``parse_generation_parameters``: the last line holds the parameters when
    it has at least three ``Key: value`` pairs; lines before ``Negative prompt:`` are the prompt
    (several lines allowed), the lines from there on the negative prompt; quoted values are
    unquoted; a ``WxH`` value such as ``Size: 512x768`` becomes ``Size-1: 512`` and
    ``Size-2: 768``. Values stay strings (see :func:`infotext_to_params` for typed values);
    A1111's UI defaults are not filled in.
    """
    if not isinstance(text, str):
        raise InvalidParameter(f"infotext must be a string, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    res = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last):
        value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    return res


def parse_hashes(value: str) -> dict[str, str]:
    """``"name: hash, name2: hash2"`` (A1111 "Lora hashes" / "TI hashes") -> ``{name: hash}``."""
    hashes = {}
    for item in value.split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = h.strip()
    return hashes


# label -> (key, converter) for infotext_to_params
_TYPED = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "VAE hash": ("vae_hash", str),
    "VAE": ("vae", str),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int),
    "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "ENSD": ("eta_noise_seed_delta", int),
    "RNG": ("rng", str),
    "Hires upscale": ("hires_upscale", float),
    "Hires resize-1": ("hires_resize_x", int),
    "Hires resize-2": ("hires_resize_y", int),
    "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str),
    "Hires sampler": ("hires_sampler", str),
    "Hires schedule type": ("hires_scheduler", str),
    "Hires prompt": ("hires_prompt", str),
    "Hires negative prompt": ("hires_negative_prompt", str),
    "Lora hashes": ("lora_hashes", parse_hashes),
    "TI hashes": ("ti_hashes", parse_hashes),
    "Emphasis": ("emphasis", str),
    "Version": ("version", str),
}


def infotext_to_params(parsed: Mapping[str, str]) -> dict[str, Any]:
    """Typed values from :func:`parse_infotext`'s result, under malerei's parameter names.

    ``prompt``, ``negative_prompt``, ``steps``, ``sampler``, ``scheduler``, ``cfg_scale``,
    ``seed``, ``width``, ``height``, ``subseed``, ``subseed_strength``, ``clip_skip`` (1 when
    absent, as A1111 assumes), ``lora_hashes``/``ti_hashes`` as dicts, ...; keys malerei does
    not know are kept as strings under ``extra``. A value of the wrong kind raises
    :class:`InvalidParameter`.
    """
    out: dict[str, Any] = {"clip_skip": 1, "extra": {}}
    for label, raw in parsed.items():
        if label not in _TYPED:
            out["extra"][label] = raw
            continue
        key, convert = _TYPED[label]
        try:
            value = convert(raw)
        except (TypeError, ValueError):
            kind = "an integer" if convert is int else "a number"
            raise InvalidParameter(f"infotext field {label!r} must be {kind}, got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameter(f"infotext field {label!r} must be a finite number, got {raw!r}")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------


def build_recipe(
    *,
    params: Mapping[str, Any],
    model_name: str,
    model_family: str,
    model_hash: str | None,
    file_hashes: Mapping[str, str],
    device: Any,
    dtype: Any,
    loras: Sequence[Mapping[str, Any]] = (),
    embeddings: Sequence[Mapping[str, Any]] = (),
    versions: Mapping[str, str] | None = None,
) -> dict:
    """The ``malerei`` JSON recipe: everything needed to make the image again.

    A pure function of its arguments and of :func:`library_versions` (pass ``versions`` to pin
    them). ``params`` holds every generation parameter as used (seed resolved, defaults filled);
    ``file_hashes`` maps each model file to its full SHA-256; ``loras`` / ``embeddings`` describe
    what was applied (name, weight, hash). Values must be JSON values (tuples become lists);
    anything else raises :class:`InvalidParameter`.
    """
    recipe = {
        "format": RECIPE_FORMAT,
        "format_version": RECIPE_FORMAT_VERSION,
        "versions": dict(library_versions() if versions is None else versions),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": {
            "name": model_name,
            "family": model_family,
            "short_hash": model_hash,
            "file_hashes": dict(file_hashes),
        },
        "loras": [dict(x) for x in loras],
        "embeddings": [dict(x) for x in embeddings],
        "params": dict(params),
    }
    try:
        return json.loads(json.dumps(recipe, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidParameter(f"recipe values must be JSON values (str, number, bool, list, dict): {exc}") from None


# --------------------------------------------------------------------------------------------
# PNG write / image read
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageMetadata:
    """What an image says about how it was made.

    ``infotext``: the A1111 text (PNG ``parameters`` chunk or JPEG/WebP EXIF UserComment), or
    ``None``; ``params``: :func:`parse_infotext` of it (empty without one); ``recipe``: the
    ``malerei`` JSON chunk, or ``None``.
    """

    infotext: str | None
    params: dict[str, str] = field(default_factory=dict)
    recipe: dict | None = None


def write_png(image, path, *, infotext: str | None, recipe: Mapping[str, Any] | None) -> Path:
    """Save ``image`` (a PIL image) as PNG with the ``parameters`` and ``malerei`` text chunks.

    Text that is not Latin-1 goes into an iTXt (UTF-8) chunk, as PIL and A1111 do. The file is
    written to a temporary name in the same folder and renamed into place, so a reader never sees
    a half-written file. Returns the path.
    """
    from PIL import Image, PngImagePlugin

    if not isinstance(image, Image.Image):
        raise ImageError(f"write_png needs a PIL image, got {type(image).__name__}")
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        if not isinstance(infotext, str):
            raise InvalidParameter("infotext must be a string")
        info.add_text(PARAMETERS_KEY, infotext)
    if recipe is not None:
        try:
            text = json.dumps(recipe, ensure_ascii=False, allow_nan=False, sort_keys=False)
        except (TypeError, ValueError) as exc:
            raise InvalidParameter(f"recipe must be JSON-serialisable: {exc}") from None
        info.add_text(RECIPE_KEY, text)

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ImageError(f"cannot write PNG {path}: {_one_line(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, ValueError)):
            raise ImageError(f"cannot write PNG {path}: {_one_line(exc)}") from None
        raise
    return path


def read_png_metadata(path_or_file) -> ImageMetadata:
    """Read the infotext and recipe of a PNG (or the infotext of an A1111 JPEG/WebP).

    ``path_or_file``: a path, a binary file object, or the file's bytes. A missing, unreadable,
    corrupt or non-image file raises :class:`ImageError` with one line saying which and why.
    """
    from PIL import Image, UnidentifiedImageError

    name, source = _source(path_or_file)
    try:
        with Image.open(source) as img:
            img.load()  # decodes everything: truncated or corrupt data fails here
            fmt = img.format
            texts = dict(getattr(img, "text", None) or {}) if fmt == "PNG" else {}
            infotext = texts.get(PARAMETERS_KEY)
            if infotext is None and fmt != "PNG":
                infotext = _exif_user_comment(img)
    except FileNotFoundError:
        raise ImageError(f"cannot read {name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"cannot read {name}: it is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {name}: not an image file (PNG, JPEG or WebP expected)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"cannot read {name}: the image is too large") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise ImageError(f"cannot read {name}: the file is corrupt or truncated ({_one_line(exc)})") from None

    recipe = None
    raw_recipe = texts.get(RECIPE_KEY)
    if raw_recipe is not None:
        try:
            recipe = json.loads(str(raw_recipe))
        except ValueError:
            raise ImageError(f"cannot read {name}: its 'malerei' recipe chunk is not valid JSON") from None
        if not isinstance(recipe, dict):
            raise ImageError(f"cannot read {name}: its 'malerei' recipe chunk is not a JSON object")
    infotext = None if infotext is None else str(infotext)
    params = parse_infotext(infotext) if infotext else {}
    return ImageMetadata(infotext=infotext, params=params, recipe=recipe)


def _source(path_or_file):
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        return "image data", io.BytesIO(bytes(path_or_file))
    if isinstance(path_or_file, (str, os.PathLike)):
        return f"'{os.fspath(path_or_file)}'", os.fspath(path_or_file)
    if hasattr(path_or_file, "read"):
        return f"'{getattr(path_or_file, 'name', 'image file')}'", path_or_file
    raise ImageError(f"cannot read image from a {type(path_or_file).__name__}; give a path, a file or bytes")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def _exif_user_comment(img) -> str | None:
    """A1111's JPEG/WebP infotext: EXIF UserComment, as piexif writes it (``UNICODE\\0`` + UTF-16-BE)."""
    try:
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return None
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw or None
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        text = body.decode("utf-16-be", errors="ignore")
    elif prefix == b"ASCII\0\0\0":
        text = body.decode("ascii", errors="ignore")
    elif prefix == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="ignore")
    else:
        text = raw.decode("utf-8", errors="ignore")
    text = text.rstrip("\0")
    return text or None
