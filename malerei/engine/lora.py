"""LoRA: apply low-rank weight deltas to a loaded model for the duration of a job.

Files: `.safetensors` in either layout (pickle files follow the --allow-pickle rule):
- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoder(s);
- diffusers / peft: `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older
  `...lora.down.weight`), `text_encoder.` / `text_encoder_2.` prefixes.
diffusers' `load_lora_weights(state_dict, adapter_name=...)` converts both offline and injects
peft adapters; `set_adapters(names, adapter_weights)` sets the per-LoRA weights (A1111's
`<lora:name:weight>` multiplier; alpha/rank scaling comes from the file).

Thread safety: applying a LoRA changes the shared model (peft layers are inserted into the
UNet and text encoders). Whoever applies LoRAs must hold `model.lock` until they are removed,
and every job using the model must hold it too, so no job runs with another job's LoRAs.
`lora_applied(model, loras)` does this: it takes the lock, loads and activates the LoRAs, and
on exit unloads them, leaving the model exactly as before (outputs are bit-identical).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from malerei.engine.errors import InvalidParameter, ModelLoadError

if TYPE_CHECKING:
    from malerei.engine.loading import LoadedModel

ADAPTER_PREFIX = "malerei_lora_"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")


def lora_layout(keys) -> str:
    """'kohya' or 'diffusers' from a LoRA file's tensor names; ModelLoadError otherwise."""
    keys = list(keys)
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(_DIFFUSERS_PREFIXES) and (".lora" in k) for k in keys):
        return "diffusers"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError("this file is a full checkpoint, not a LoRA; put it in the models folder itself")
    raise ModelLoadError(
        "not a LoRA in a supported layout; supported: kohya (lora_unet_*/lora_te_* with lora_down/lora_up/alpha) "
        "and diffusers/peft (unet.*/text_encoder.* with lora_A/lora_B)"
    )


def _adapter_name(index: int, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]
    return f"{ADAPTER_PREFIX}{index}_{stem}"


def _active_adapters(pipe) -> set[str]:
    try:
        lists = pipe.get_list_adapters()
    except (ValueError, AttributeError):
        return set()
    return {name for names in lists.values() for name in names}


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise InvalidParameter(f"LoRA weight must be a finite number, got {weight!r}")
    return float(weight)


def apply_loras(pipe, loras: Sequence[tuple[str | Path, float]], *, allow_pickle: bool = False) -> list[str]:
    """Load each (path, weight) as a peft adapter and activate them together with their weights.

    Returns the adapter names (pass them to `remove_loras`). On any error nothing stays applied.
    The caller must hold the model's lock until `remove_loras` (see the module docstring).
    """
    from malerei.engine.checkpoint_files import load_state_dict
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    names: list[str] = []
    weights: list[float] = []
    try:
        for index, (ref, weight) in enumerate(loras):
            path = Path(ref)
            weight = _check_weight(weight)
            state = load_state_dict(path, allow_pickle=allow_pickle)
            try:
                lora_layout(state.keys())
            except ModelLoadError as exc:
                raise ModelLoadError(f"{path.name}: {exc}") from exc
            name = _adapter_name(index, path)
            try:
                pipe.load_lora_weights(state, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelLoadError(f"{path.name}: LoRA does not fit this model ({first[:240]})") from exc
            if name not in _active_adapters(pipe):
                raise ModelLoadError(f"{path.name}: LoRA matched no layer of this model (wrong model family?)")
            names.append(name)
            weights.append(weight)
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
    except BaseException:
        remove_loras(pipe, names + [n for n in _active_adapters(pipe) if n.startswith(ADAPTER_PREFIX)])
        raise
    return names


def remove_loras(pipe, names: Sequence[str] | None = None) -> None:
    """Remove the named adapters (default: every adapter malerei added). When none is left, the
    peft layers are taken out entirely, restoring the original modules and outputs exactly."""
    present = _active_adapters(pipe)
    doomed = [n for n in (names if names is not None else present) if n in present]
    if doomed:
        pipe.delete_adapters(doomed)
    if not (_active_adapters(pipe) - set(doomed)) and present:
        pipe.unload_lora_weights()


@contextmanager
def lora_applied(
    model: "LoadedModel",
    loras: Sequence[tuple[str | Path, float]],
    *,
    models_dir: Path | None = None,
    allow_pickle: bool | None = None,
) -> Iterator[list[str]]:
    """Hold `model.lock`, apply `loras` ((name or path, weight) pairs, names looked up in the
    models folder's Lora/), yield the adapter names, and remove them again on exit.

    `models_dir` and `allow_pickle` default to those the model was loaded with."""
    if not loras:
        yield []
        return
    from malerei.engine.model_dir import resolve_lora

    folder = models_dir if models_dir is not None else getattr(model, "models_dir", None)
    pickles = allow_pickle if allow_pickle is not None else bool(getattr(model, "allow_pickle", False))
    resolved = [(resolve_lora(ref, folder), _check_weight(weight)) for ref, weight in loras]
    with model.lock:
        names = apply_loras(model.pipe, resolved, allow_pickle=pickles)
        try:
            yield names
        finally:
            remove_loras(model.pipe, names)
