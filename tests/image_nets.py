"""Randomly initialised upscaler / restorer networks saved in the real file layouts users have.

- ESRGAN (original repo): the bare state dict with ``model.0.weight``, ``model.1.sub.N.RDBk...``
  keys, as in ``4x_foolhardy_Remacri.pth``.
- Real-ESRGAN (BasicSR ``RRDBNet``): ``{"params_ema": {conv_first, body.N.rdbk.convj,
  conv_body, conv_up1, conv_up2, conv_hr, conv_last}}``, as in ``RealESRGAN_x4plus.pth``; the
  x2 model takes a pixel-unshuffled input (``conv_first`` with 12 input channels).
- SwinIR (original repo): ``{"params": ...}``, as in ``001_classicalSR_DF2K_s64w8_SwinIR-M_x2.pth``.
- Compact (Real-ESRGAN ``SRVGGNetCompact``): ``{"params": ...}``, as ``realesr-general-x4v3.pth``.
- GFPGAN v1.4 (``GFPGANv1Clean``): ``{"params_ema": ...}``; CodeFormer: ``{"params_ema": ...}``.

Widths are tiny where the file format allows it (GFPGAN's size is fixed by its format).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _conv(i: int, o: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, 1, 1)


class _RDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = _conv(nf, gc), _conv(nf + gc, gc), _conv(nf + 2 * gc, gc)
        self.conv4, self.conv5 = _conv(nf + 3 * gc, gc), _conv(nf + 4 * gc, nf)


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _RDB(nf, gc), _RDB(nf, gc), _RDB(nf, gc)


class BasicSRRRDBNet(nn.Module):
    """BasicSR's RRDBNet parameter layout (Real-ESRGAN); spandrel runs it, this only names weights."""

    def __init__(self, *, scale: int = 4, num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 32) -> None:
        super().__init__()
        in_ch = 3 * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = _conv(in_ch, num_feat)
        self.body = nn.Sequential(*[_RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1, self.conv_up2 = _conv(num_feat, num_feat), _conv(num_feat, num_feat)
        self.conv_hr, self.conv_last = _conv(num_feat, num_feat), _conv(num_feat, 3)


def _seeded(build):
    """Builders draw every random number from their own seed: what a constructor initialises itself
    (biases, norms) would otherwise come from the global RNG, so a network (and whether its output
    clamps to black) depended on which tests ran before."""
    import functools
    import inspect

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(build).bind(*args, **kwargs)
        bound.apply_defaults()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + bound.arguments["seed"])
            return build(*args, **kwargs)

    return wrapper


def _small_init(module: nn.Module, seed: int) -> nn.Module:
    """Random weights small enough that deep random nets stay in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(p[0].numel(), 1)) ** 0.5)
    return module.eval()


@_seeded
def realesrgan_state(scale: int = 4, seed: int = 0) -> dict:
    return {"params_ema": _small_init(BasicSRRRDBNet(scale=scale), seed).state_dict()}


@_seeded
def esrgan_state(scale: int = 4, seed: int = 1) -> dict:
    from spandrel.architectures.ESRGAN import ESRGAN

    return _small_init(ESRGAN(num_filters=8, num_blocks=1, scale=scale), seed).state_dict()


@_seeded
def swinir_state(scale: int = 2, seed: int = 2) -> dict:
    from spandrel.architectures.SwinIR import SwinIR

    net = SwinIR(upscale=scale, img_size=16, window_size=4, embed_dim=12, depths=[2], num_heads=[2], mlp_ratio=2.0,
                 upsampler="pixelshuffle", resi_connection="1conv", img_range=1.0)
    return {"params": _small_init(net, seed).state_dict()}


@_seeded
def compact_state(scale: int = 4, seed: int = 3) -> dict:
    from spandrel.architectures.Compact import Compact

    return {"params": _small_init(Compact(num_feat=8, num_conv=3, upscale=scale), seed).state_dict()}


@_seeded
def gfpgan_state(seed: int = 4) -> dict:
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    return {"params_ema": GFPGAN().eval().state_dict()}


@_seeded
def codeformer_state(seed: int = 5) -> dict:
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(seed)
    net = CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, latent_size=256,
                     connect_list=["32", "64", "128", "256"], fix_modules=["quantize", "generator"])
    return {"params_ema": net.eval().state_dict()}


def save(state: dict, path: Path) -> Path:
    """``.pth``: torch.save of the (wrapped) dict, as the projects publish them; ``.safetensors``:
    the flat state dict (safetensors holds no nesting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = state
        if len(state) == 1 and isinstance(next(iter(state.values())), dict):
            flat = next(iter(state.values()))
        save_file({k: v.detach().contiguous().clone() for k, v in flat.items()}, str(path))
    else:
        torch.save(state, path)
    return path
