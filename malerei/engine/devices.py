"""Device and dtype choice, and diffusers' memory switches.

Nothing here runs at import time: torch is imported inside the functions, and devices are probed
only when `pick_device` is called.

    device = pick_device(None)            # cuda (also ROCm builds), then mps, then cpu
    dtype = pick_dtype(None, device)      # fp32 on cpu, fp16 on cuda/mps
    apply_memory_options(pipe, attention_slicing=False, vae_tiling=True, vae_slicing=False,
                         cpu_offload="none")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from malerei.engine.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("auto", "cuda", "mps", "cpu")
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "half": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
CPU_OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    """diffusers' memory switches; part of the model cache key because they change the pipeline."""

    attention_slicing: bool = False  # compute attention in slices: less VRAM, a little slower
    vae_tiling: bool = False  # decode/encode big images tile by tile (needed for >2k px on small GPUs)
    vae_slicing: bool = False  # decode a batch one image at a time
    cpu_offload: str = "none"  # "model": whole components move to the GPU when used; "sequential": layer by layer

    def __post_init__(self) -> None:
        if self.cpu_offload not in CPU_OFFLOAD_MODES:
            raise InvalidParameter(
                f"unknown cpu offload mode {self.cpu_offload!r}; allowed: {', '.join(CPU_OFFLOAD_MODES)}"
            )


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str | None = None) -> "torch.device":
    """The torch device for `name`: None/"auto" picks cuda (ROCm builds also report as cuda), then mps,
    then cpu. "cuda:1" selects a GPU index. A named device that is not available raises InvalidParameter."""
    import torch

    requested = (name or "auto").strip().lower()
    kind, _, index = requested.partition(":")
    if kind not in DEVICE_NAMES or (index and (kind != "cuda" or not index.isdigit())):
        raise InvalidParameter(
            f"unknown device {name!r}; allowed: auto, cuda, cuda:<index>, mps, cpu"
        )
    if kind == "auto":
        if torch.cuda.is_available():  # true on ROCm builds too (torch.version.hip is set there)
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameter(
                f"device {name!r} is not available: this torch build sees no CUDA/ROCm GPU; "
                "use 'cpu' or 'auto'"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise InvalidParameter(
                f"device {name!r} is not available: {torch.cuda.device_count()} GPU(s) visible "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device(requested)
    if kind == "mps" and not _mps_available(torch):
        raise InvalidParameter(f"device {name!r} is not available on this machine; use 'cpu' or 'auto'")
    return torch.device(kind)


def gpu_backend() -> str:
    """'rocm', 'cuda' or 'none': which GPU stack this torch build was made for (no device probing)."""
    import torch

    if getattr(torch.version, "hip", None):
        return "rocm"
    if getattr(torch.version, "cuda", None):
        return "cuda"
    return "none"


def pick_dtype(name: str | None, device: "torch.device") -> "torch.dtype":
    """The weights dtype: by default fp32 on cpu, fp16 on cuda/mps. "fp32", "fp16" and "bf16" may be
    named. fp16 on cpu is refused (many CPU kernels lack it and it gives no speed there)."""
    import torch

    if name is None or name.strip().lower() == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    key = name.strip().lower()
    if key not in DTYPE_NAMES:
        raise InvalidParameter(f"unknown dtype {name!r}; allowed: auto, fp32, fp16, bf16")
    dtype = getattr(torch, DTYPE_NAMES[key])
    if dtype == torch.float16 and device.type == "cpu":
        raise InvalidParameter("dtype fp16 is not supported on cpu; use fp32 or bf16 there")
    return dtype


def use_sdpa(pipe) -> None:
    """Make every attention layer of the pipeline's UNet and VAE use PyTorch's scaled-dot-product
    attention (diffusers' AttnProcessor2_0, its default when torch has SDPA). Called after loading
    because a loaded model may carry other processors (e.g. after LoRA or custom code)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor2_0())


def apply_memory_options(
    pipe,
    *,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    cpu_offload: str = "none",
    device: "torch.device | None" = None,
) -> None:
    """Switch diffusers' memory savers on (or off) on a loaded pipeline.

    cpu_offload "model"/"sequential" keep weights on the CPU and move them to `device` (a GPU) only
    while used; they need accelerate and a GPU. With "none" the caller moves the pipeline itself.
    """
    if cpu_offload not in CPU_OFFLOAD_MODES:
        raise InvalidParameter(
            f"unknown cpu offload mode {cpu_offload!r}; allowed: {', '.join(CPU_OFFLOAD_MODES)}"
        )
    if attention_slicing:
        pipe.enable_attention_slicing()
    else:
        # disable_attention_slicing() resets to the default processor, which is SDPA.
        pipe.disable_attention_slicing()
    vae = pipe.vae
    vae.enable_tiling() if vae_tiling else vae.disable_tiling()
    vae.enable_slicing() if vae_slicing else vae.disable_slicing()
    if cpu_offload != "none":
        if device is None or device.type == "cpu":
            raise InvalidParameter(
                f"cpu offload {cpu_offload!r} needs a GPU device (cuda or mps); on cpu use 'none'"
            )
        if cpu_offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
