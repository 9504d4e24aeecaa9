"""Reading weight files safely: `.safetensors` always, pickle files only on request.

Pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`) can run arbitrary code when unpickled. malerei
refuses them with `PickleRefused` unless the user opts in (`--allow-pickle`, `allow_pickle=True`),
and even then loads them with `torch.load(weights_only=True)`, whose restricted unpickler only
rebuilds tensors and plain containers; anything else becomes a `ModelLoadError`.

`read_safetensors_header` needs neither torch nor safetensors: the format is an 8-byte
little-endian header length, a JSON header, then raw tensor bytes. It is used to validate a file
before loading and to detect a checkpoint's family cheaply when listing models.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from malerei.engine.errors import ModelLoadError, ModelNotFound, PickleRefused

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few MB at most


def is_pickle_file(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _require_file(path: Path) -> None:
    if not path.exists():
        raise ModelNotFound(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a `.safetensors` file: tensor name -> {"dtype", "shape", "data_offsets"},
    plus "__metadata__" when present. Raises ModelLoadError (one line) for a truncated or garbage file."""
    path = Path(path)
    _require_file(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"{path.name}: not a valid .safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > _MAX_HEADER_BYTES or header_len > size - 8:
                raise ModelLoadError(
                    f"{path.name}: not a valid .safetensors file (corrupt or truncated header)"
                )
            raw = stream.read(header_len)
    except OSError as exc:
        raise ModelLoadError(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path.name}: not a valid .safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: not a valid .safetensors file (header is not a table)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ModelLoadError(
                f"{path.name}: not a valid .safetensors file (tensor {name!r} lies outside the file; "
                "truncated download?)"
            )
    return header


def tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """name -> shape from a safetensors header (metadata left out)."""
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def load_pickle_object(path: Path, *, allow_pickle: bool) -> Any:
    """Unpickle `path` with torch's restricted unpickler (weights_only=True), if the user allowed it."""
    path = Path(path)
    _require_file(path)
    if not allow_pickle:
        raise PickleRefused(
            f"{path.name} is a pickle file ({path.suffix}), which can run code when loaded; refused. "
            "Use a .safetensors file, or pass --allow-pickle (allow_pickle=True) if you trust it "
            "(it is then loaded with torch.load(weights_only=True))"
        )
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path.name}: refused to unpickle: it holds objects other than tensors and plain "
            f"containers, which torch.load(weights_only=True) does not run ({first})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path.name}: cannot be read as a torch checkpoint ({first})") from exc


def load_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """All tensors of a weight file as a flat name -> tensor dict, on the CPU.

    `.safetensors` is validated, then loaded; pickle files follow the rule in the module docstring.
    A nested `state_dict` (as in CompVis `.ckpt` files) is unwrapped.
    """
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        read_safetensors_header(path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{path.name}: not a valid .safetensors file ({first})") from exc
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle_object(path, allow_pickle=allow_pickle)
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{path.name}: holds a {type(obj).__name__}, not a table of weights")
        import torch

        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    raise ModelLoadError(
        f"{path.name}: unsupported file type {path.suffix!r}; allowed: .safetensors "
        f"(and {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
    )
