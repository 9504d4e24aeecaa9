"""Textual-inversion embeddings (A1111's `embeddings/` folder).

An embedding is a few learned input vectors that stand for a word; the word is the file stem.
Formats read:
- A1111 `.safetensors`: `emb_params` `[n, dim]`; SDXL: `clip_l` `[n, 768]` and `clip_g` `[n, 1280]`;
  also a flattened `string_to_param.*` or a single tensor under any name (diffusers' format);
- A1111 `.pt` (pickle): `{"string_to_param": {"*": [n, dim]}, ...}` or `{"emb_params": ...}`;
  diffusers `.bin` (pickle): `{"<token>": [dim]}`. Pickles need --allow-pickle and are read
  with torch.load(weights_only=True).

The prompt encoder (`prompts.encode_prompts`) takes a mapping word -> vectors: a `[n, dim]` tensor
for SD1/SD2, `{"clip_l": ..., "clip_g": ...}` for SDXL; `Embedding.vectors` is in that form.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malerei.engine.checkpoint_files import PICKLE_SUFFIXES, load_pickle_object, load_state_dict
from malerei.engine.errors import MalereiError, ModelLoadError

if TYPE_CHECKING:
    from malerei.engine.loading import LoadedModel
    from malerei.engine.model_dir import ModelEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedding:
    name: str  # the word in prompts: the file stem
    vectors: Any  # torch.Tensor [n, dim] (SD1/SD2) or {"clip_l": [n, 768], "clip_g": [n, 1280]} (SDXL)
    path: Path | None = None

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def n_vectors(self) -> int:
        first = self.vectors["clip_l"] if self.is_sdxl else self.vectors
        return int(first.shape[0])

    def fits(self, pipe) -> bool:
        """Whether the vectors match the pipeline's text encoder width(s)."""
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        second = getattr(pipe, "text_encoder_2", None)
        if self.is_sdxl:
            if second is None:
                return False
            width_2 = second.get_input_embeddings().weight.shape[1]
            return self.vectors["clip_l"].shape[1] == width and self.vectors["clip_g"].shape[1] == width_2
        return second is None and self.vectors.shape[1] == width


def _as_matrix(value, what: str):
    import torch

    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(f"{what}: expected a tensor, found {type(value).__name__}")
    tensor = value.detach().to(torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ModelLoadError(f"{what}: expected vectors of shape [n, dim], found {tuple(value.shape)}")
    return tensor.contiguous()


def _vectors_from(data: dict, name: str):
    import torch

    if "clip_l" in data or "clip_g" in data:
        if not ("clip_l" in data and "clip_g" in data):
            raise ModelLoadError(f"{name}: SDXL embedding needs both clip_l and clip_g")
        pair = {"clip_l": _as_matrix(data["clip_l"], name), "clip_g": _as_matrix(data["clip_g"], name)}
        if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise ModelLoadError(f"{name}: clip_l and clip_g hold different numbers of vectors")
        return pair
    if "emb_params" in data:
        return _as_matrix(data["emb_params"], name)
    params = data.get("string_to_param")
    if isinstance(params, dict):
        if len(params) != 1:
            raise ModelLoadError(f"{name}: holds {len(params)} terms; one embedding per file is supported")
        return _as_matrix(next(iter(params.values())), name)
    flat = {k: v for k, v in data.items() if isinstance(k, str) and k.startswith("string_to_param.")}
    if len(flat) == 1:
        return _as_matrix(next(iter(flat.values())), name)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers' textual inversion: {"<token>": [dim]}
        return _as_matrix(next(iter(tensors.values())), name)
    raise ModelLoadError(
        f"{name}: not a textual-inversion embedding; expected emb_params, string_to_param, "
        "or clip_l + clip_g (SDXL)"
    )


_cache: OrderedDict[tuple, Embedding] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 256


def load_embedding(path: Path, *, allow_pickle: bool = False) -> Embedding:
    """Read one embedding file; its word is the file stem. Results are cached in the process by
    (path, mtime, size), since jobs look the whole embeddings folder up each time; the vectors are
    shared, do not modify them."""
    path = Path(path)
    is_pickle = path.suffix.lower() in PICKLE_SUFFIXES
    if is_pickle and not allow_pickle:
        load_pickle_object(path, allow_pickle=False)  # raises PickleRefused (or ModelNotFound)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None  # missing file: the reader below raises the clear error
    if key is not None:
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
    if is_pickle:
        data = load_pickle_object(path, allow_pickle=allow_pickle)
        if not isinstance(data, dict):
            raise ModelLoadError(f"{path.name}: holds a {type(data).__name__}, not an embedding")
    else:
        data = load_state_dict(path, allow_pickle=allow_pickle)
    embedding = Embedding(name=path.stem, vectors=_vectors_from(data, path.name), path=path)
    if key is not None:
        with _cache_lock:
            _cache[key] = embedding
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return embedding


def list_embeddings(models_dir: Path | None = None) -> list["ModelEntry"]:
    """Embedding files in the models folder's embeddings/ (kind "embedding"; name = word)."""
    from malerei.engine.model_dir import list_embedding_files

    return list_embedding_files(models_dir)


@dataclass
class EmbeddingSet:
    vectors: dict[str, Any] = field(default_factory=dict)  # word -> vectors, for prompts.encode_prompts
    skipped: dict[str, str] = field(default_factory=dict)  # word -> why it was not loaded


def load_embeddings_for(
    model: "LoadedModel", *, models_dir: Path | None = None, allow_pickle: bool | None = None
) -> EmbeddingSet:
    """Every embedding in the models folder that fits `model` (A1111 behaviour: SD1, SD2 and SDXL
    embeddings can share the folder; those for another family are skipped and listed with the
    reason, as are unreadable files and pickles without the opt-in)."""
    folder = models_dir if models_dir is not None else model.models_dir
    pickles = allow_pickle if allow_pickle is not None else model.allow_pickle
    result = EmbeddingSet()
    for entry in list_embeddings(folder):
        if entry.name in result.vectors:
            result.skipped[entry.name] = f"duplicate name ({entry.path})"
            continue
        try:
            embedding = load_embedding(entry.path, allow_pickle=pickles)
        except MalereiError as exc:
            result.skipped[entry.name] = str(exc)
            continue
        if not embedding.fits(model.pipe):
            result.skipped[entry.name] = f"made for another model family than {model.family}"
            continue
        result.vectors[entry.name] = embedding.vectors
    if result.skipped:
        log.info("skipped embeddings: %s", ", ".join(sorted(result.skipped)))
    return result
