"""The models folder: where users keep checkpoints, LoRAs and embeddings, and how names resolve.

Layout (A1111 / ComfyUI folders are recognised too, so an existing models folder can be reused):

    <models_dir>/
        my-model.safetensors          single-file checkpoints (.safetensors; .ckpt needs --allow-pickle)
        my-diffusers-model/           diffusers folders (with model_index.json)
        Stable-diffusion/, checkpoints/   more checkpoints (searched recursively)
        Lora/, loras/                 LoRA files, listed separately
        embeddings/                   textual-inversion embeddings, listed separately
        .malerei-hashes.json          SHA-256 cache (path + mtime + size -> hash)

`models_dir` defaults to platformdirs' user data dir for "malerei" plus "/models";
the environment variable MALEREI_MODELS_DIR overrides it.

A model's name is its file stem or folder name. The short hash is A1111's: the first 10 hex
digits of the SHA-256 of the whole file; for a diffusers folder, of its UNet weights file.
No torch import here: listing models stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from malerei.engine.checkpoint_files import read_safetensors_header, tensor_shapes
from malerei.engine.errors import InvalidParameter, MalereiError, ModelNotFound

log = logging.getLogger(__name__)

MODELS_DIR_ENV = "MALEREI_MODELS_DIR"
BUILTIN_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
CHECKPOINT_SUBDIRS = ("stable-diffusion", "checkpoints")
LORA_SUBDIRS = ("lora", "loras")
EMBEDDING_SUBDIRS = ("embeddings",)
HASH_CACHE_NAME = ".malerei-hashes.json"
UNET_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what users type: file stem or folder name
    path: Path
    kind: str  # "checkpoint" | "diffusers" | "lora" | "embedding"
    family_if_cheap: str | None  # "sd1" | "sd2" | "sdxl" when readable without loading weights
    short_hash: str | None  # A1111 short hash; None when not computed (hashes=False) or unreadable


def default_models_dir() -> Path:
    """$MALEREI_MODELS_DIR, else <platformdirs user data dir>/models."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("malerei", appauthor=False)) / "models"


# ---------------------------------------------------------------------------------------------
# hashing


class HashCache:
    """SHA-256 of files, cached in a JSON file keyed by absolute path; an entry is reused only
    while the file's mtime and size are unchanged. Safe to share between threads; writes are
    atomic (temp file + rename). A cache that cannot be written is skipped with a warning."""

    def __init__(self, cache_file: Path | None):
        self.cache_file = cache_file
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.cache_file is not None and self.cache_file.is_file():
                try:
                    data = json.loads(self.cache_file.read_text(encoding="utf-8"))
                    if isinstance(data, dict):
                        self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
                except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                    log.warning("ignoring unreadable hash cache %s", self.cache_file)
        return self._entries

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key = str(path)
        with self._lock:
            entry = self._load().get(key)
            if entry and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get("size") == stat.st_size:
                return entry["sha256"]
        digest = _sha256_file(path)
        with self._lock:
            self._load()[key] = {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "sha256": digest}
            self._save()
        return digest

    def _save(self) -> None:
        if self.cache_file is None or not self.cache_file.parent.is_dir():
            return  # no models folder (a model loaded by path): hash without caching
        tmp = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(self._entries, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.warning("cannot write hash cache %s: %s", self.cache_file, exc)
            tmp.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


_caches: dict[str, HashCache] = {}
_caches_lock = threading.Lock()


def hash_cache(models_dir: Path | None) -> HashCache:
    """The process-wide HashCache for a models folder (one object per folder, so threads share it)."""
    directory = Path(models_dir) if models_dir is not None else default_models_dir()
    key = str(directory.resolve())
    with _caches_lock:
        if key not in _caches:
            _caches[key] = HashCache(directory / HASH_CACHE_NAME)
        return _caches[key]


def short_hash(sha256: str) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256[:10]


def diffusers_unet_weights(folder: Path) -> Path | None:
    """The UNet weights file of a diffusers folder (the one the short hash is taken of)."""
    unet = Path(folder) / "unet"
    for name in UNET_WEIGHT_NAMES:
        if (unet / name).is_file():
            return unet / name
    shards = sorted(unet.glob("diffusion_pytorch_model*.safetensors.index.json"))
    return shards[0] if shards else None


def model_short_hash(path: Path, *, models_dir: Path | None = None) -> str | None:
    """Short hash of a checkpoint file or diffusers folder (None if a folder has no UNet weights)."""
    path = Path(path)
    target = diffusers_unet_weights(path) if path.is_dir() else path
    if target is None:
        return None
    return short_hash(hash_cache(models_dir).sha256(target))


# ---------------------------------------------------------------------------------------------
# listing


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def diffusers_folder_family(folder: Path) -> str | None:
    """Family of a diffusers folder from its JSON configs (no weights read), or None if unknown."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(index, dict) or not isinstance(unet, dict):
        return None
    if "XL" in str(index.get("_class_name", "")) or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    # A UNet with a learned class/projection embedding is not a plain SD1/SD2 text-to-image model.
    if unet.get("class_embed_type") or unet.get("addition_embed_type"):
        return None
    cross = unet.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    # Other widths (small custom models such as the built-in one): the text encoder tells.
    # SD1's OpenAI CLIP uses the quick_gelu activation, SD2's OpenCLIP plain gelu.
    try:
        text = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    act = text.get("hidden_act") if isinstance(text, dict) else None
    return {"quick_gelu": "sd1", "gelu": "sd2"}.get(act)


def file_family_if_cheap(path: Path) -> str | None:
    """Family of a .safetensors checkpoint from its header alone; None for pickles or unknown files."""
    if path.suffix.lower() != ".safetensors":
        return None
    from malerei.engine.single_file import try_detect_family

    try:
        return try_detect_family(tensor_shapes(read_safetensors_header(path)))
    except MalereiError:
        return None


def _subdirs(root: Path, names: Iterable[str]) -> list[Path]:
    wanted = {n.lower() for n in names}
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in wanted)


def _files(folder: Path, suffixes: tuple[str, ...], *, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(
        p for p in pattern
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def _safe_hash(path: Path, models_dir: Path) -> str | None:
    try:
        return model_short_hash(path, models_dir=models_dir)
    except OSError as exc:
        log.warning("cannot hash %s: %s", path, exc)
        return None


def list_models(models_dir: Path | None = None, *, hashes: bool = True) -> list[ModelEntry]:
    """Checkpoints (kind "checkpoint") and diffusers folders (kind "diffusers") in the models folder,
    sorted by name. `hashes=False` skips the short hashes (the first hash of a big file takes seconds;
    later ones come from the cache)."""
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    if not root.is_dir():
        return []
    entries: list[ModelEntry] = []
    special = {n.lower() for n in (*CHECKPOINT_SUBDIRS, *LORA_SUBDIRS, *EMBEDDING_SUBDIRS)}
    folders = [root, *_subdirs(root, CHECKPOINT_SUBDIRS)]
    for i, folder in enumerate(folders):
        for path in _files(folder, CHECKPOINT_SUFFIXES, recursive=i > 0):
            entries.append(ModelEntry(
                name=path.stem, path=path, kind="checkpoint", family_if_cheap=file_family_if_cheap(path),
                short_hash=_safe_hash(path, root) if hashes else None,
            ))
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if i == 0 and sub.name.lower() in special:
                continue
            if is_diffusers_folder(sub):
                entries.append(ModelEntry(
                    name=sub.name, path=sub, kind="diffusers", family_if_cheap=diffusers_folder_family(sub),
                    short_hash=_safe_hash(sub, root) if hashes else None,
                ))
    return sorted(entries, key=lambda e: (e.name.lower(), str(e.path)))


def _list_kind(models_dir: Path | None, subdirs, suffixes, kind: str, hashes: bool) -> list[ModelEntry]:
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    entries = []
    for folder in _subdirs(root, subdirs):
        for path in _files(folder, suffixes, recursive=True):
            entries.append(ModelEntry(
                name=path.stem, path=path, kind=kind, family_if_cheap=None,
                short_hash=_safe_hash(path, root) if hashes else None,
            ))
    return sorted(entries, key=lambda e: (e.name.lower(), str(e.path)))


def list_loras(models_dir: Path | None = None, *, hashes: bool = False) -> list[ModelEntry]:
    """LoRA files under Lora/ (or loras/), recursively; name = file stem."""
    return _list_kind(models_dir, LORA_SUBDIRS, LORA_SUFFIXES, "lora", hashes)


def list_embedding_files(models_dir: Path | None = None, *, hashes: bool = False) -> list[ModelEntry]:
    """Embedding files under embeddings/, recursively; name = file stem."""
    return _list_kind(models_dir, EMBEDDING_SUBDIRS, EMBEDDING_SUFFIXES, "embedding", hashes)


# ---------------------------------------------------------------------------------------------
# resolving


def _looks_like_path(ref: str) -> bool:
    """A ref with a folder part is a path only; a bare name (with or without suffix) is looked up."""
    return os.sep in ref or "/" in ref or ref.startswith(("~", "."))


def _pick(ref: str, entries: list[ModelEntry], what: str, where: Path) -> Path:
    matches = [e for e in entries if e.name == ref or e.path.name == ref]
    if not matches:
        matches = [e for e in entries if e.name.lower() == ref.lower() or e.path.name.lower() == ref.lower()]
    if len(matches) == 1:
        return matches[0].path
    if len(matches) > 1:
        paths = ", ".join(str(e.path) for e in matches)
        raise InvalidParameter(f"{what} name {ref!r} is ambiguous in {where}: {paths}; give a path instead")
    names = sorted({e.name for e in entries}, key=str.lower)
    available = ", ".join(names) if names else f"none (the folder {where} has no {what}s)"
    raise ModelNotFound(f"no {what} named {ref!r} in {where}; available: {available}")


def resolve_model(ref: str | os.PathLike | None, models_dir: Path | None = None) -> Path:
    """The path of a model: `ref` may be a path (file or diffusers folder) or a name from the models
    folder (file stem, file name or folder name). None means the built-in model."""
    if ref is None:
        if not is_diffusers_folder(BUILTIN_MODEL_DIR):
            raise ModelNotFound(
                f"the built-in model is not installed (expected a diffusers folder at {BUILTIN_MODEL_DIR}); "
                "name a model or a path"
            )
        return BUILTIN_MODEL_DIR
    text = os.fspath(ref)
    if not text.strip():
        raise InvalidParameter("empty model name; give a model name, a path, or nothing for the built-in model")
    candidate = Path(text).expanduser()
    if candidate.exists():
        return candidate.resolve()
    if isinstance(ref, os.PathLike) or _looks_like_path(text):
        raise ModelNotFound(f"{text}: no such file or folder")
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    return _pick(text, list_models(root, hashes=False), "model", root)


def resolve_lora(ref: str | os.PathLike, models_dir: Path | None = None) -> Path:
    """A LoRA file from a path or a name in the models folder's Lora/ (as in `<lora:name:w>`)."""
    text = os.fspath(ref)
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate.resolve()
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    return _pick(text, list_loras(root), "LoRA", root / "Lora")
