"""Upscalers through spandrel: real file layouts, the pickle rule, tiling, name lookup."""

from __future__ import annotations

import pickle

import image_nets
import numpy as np
import pytest
import torch
from PIL import Image

from malerei.engine import upscale
from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound, PickleRefused

torch.set_num_threads(1)

NETS = {  # name -> (state builder, file suffix, architecture, scale)
    "esrgan-x4": (lambda: image_nets.esrgan_state(4), ".pth", "ESRGAN", 4),
    "realesrgan-x4": (lambda: image_nets.realesrgan_state(4), ".pth", "ESRGAN", 4),
    "realesrgan-x2": (lambda: image_nets.realesrgan_state(2), ".safetensors", "ESRGAN", 2),
    "swinir-x2": (lambda: image_nets.swinir_state(2), ".pth", "SwinIR", 2),
    "swinir-x2-st": (lambda: image_nets.swinir_state(2), ".safetensors", "SwinIR", 2),
    "compact-x4": (lambda: image_nets.compact_state(4), ".safetensors", "Compact", 4),
}


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    return {name: image_nets.save(build(), root / f"{name}{suffix}") for name, (build, suffix, _, _) in NETS.items()}


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 4 + 1, w // 4 + 1, 3))
    return Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("name", list(NETS))
def test_real_layouts_load_through_spandrel(net_files, name):
    _, suffix, arch, scale = NETS[name]
    model = upscale.load_upscaler(net_files[name], allow_pickle=True)
    assert (model.architecture, model.scale, model.purpose) == (arch, scale, "SR")
    assert model.name == name and len(model.short_hash) == 10
    out = upscale.apply_model(model, noise_image(20, 12))
    assert out.size == (20 * scale, 12 * scale)
    assert np.asarray(out).std() > 1  # a real network ran, not a blank


def test_pickle_files_need_the_opt_in_and_load_weights_only(net_files, monkeypatch):
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        upscale.load_upscaler(net_files["realesrgan-x4"])
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("spandrel's own file loading must not be used")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(torch.jit, "load", never)
    from spandrel import ModelLoader

    monkeypatch.setattr(ModelLoader, "load_from_file", never)
    monkeypatch.setattr(ModelLoader, "load_state_dict_from_file", never)
    upscale.load_upscaler(net_files["realesrgan-x4"], allow_pickle=True)
    assert calls and all(c.get("weights_only") is True for c in calls)


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"params": {"conv.weight": torch.zeros(1)}, "x": Payload()}, f)
    with pytest.raises(ModelLoadError, match="weights_only"):
        upscale.load_upscaler(path, allow_pickle=True)


def test_unknown_and_wrong_purpose_models(tmp_path):
    junk = image_nets.save({"some.layer.weight": torch.zeros(3, 3)}, tmp_path / "junk.safetensors")
    with pytest.raises(ModelLoadError, match="spandrel knows"):
        upscale.load_upscaler(junk)
    restorer = image_nets.save(image_nets.compact_state(1), tmp_path / "denoise.safetensors")
    with pytest.raises(ModelLoadError, match="is not an upscaler"):
        upscale.load_upscaler(restorer)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError):
        upscale.load_upscaler(bad)
    onnx = tmp_path / "weights.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported file type"):
        upscale.load_upscaler(onnx)


def test_names_resolve_in_the_models_folder(net_files, tmp_path):
    models = tmp_path / "models"
    (models / "ESRGAN").mkdir(parents=True)
    (models / "ESRGAN" / "4x-Tiny.safetensors").write_bytes(net_files["compact-x4"].read_bytes())
    model = upscale.load_upscaler("4x-Tiny", models_dir=models)
    assert model.path.parent.name == "ESRGAN" and model.scale == 4
    with pytest.raises(ModelNotFound, match="4x-Tiny"):
        upscale.load_upscaler("4x-Other", models_dir=models)
    with pytest.raises(ModelNotFound, match="no such file"):
        upscale.load_upscaler(tmp_path / "missing.pth")


def test_builtin_upscaler_missing_is_a_clear_error():
    if upscale.BUILTIN_UPSCALER.is_file():
        assert upscale.load_upscaler(None).scale == 4
    else:
        with pytest.raises(ModelNotFound, match="built-in upscaler"):
            upscale.load_upscaler(None)


@pytest.mark.parametrize("name", ["esrgan-x4", "realesrgan-x2", "compact-x4", "swinir-x2"])
def test_tiled_equals_untiled(net_files, name):
    model = upscale.load_upscaler(net_files[name], allow_pickle=True)
    image = noise_image(70, 50, seed=3)
    whole = np.asarray(upscale.apply_model(model, image, tile=4096)).astype(int)
    tiled = np.asarray(upscale.apply_model(model, image, tile=24, overlap=16)).astype(int)
    assert np.abs(whole - tiled).max() <= 1  # 8-bit rounding only


def test_tiles_bound_the_input_size():
    sizes = []

    def fn(x):
        sizes.append(tuple(x.shape[-2:]))
        return x.repeat_interleave(2, -1).repeat_interleave(2, -2)

    x = torch.rand(1, 3, 100, 90)
    out = upscale.run_tiled(fn, x, 2, tile=32, overlap=8)
    assert torch.equal(out, x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert len(sizes) == 4 * 3 and max(max(s) for s in sizes) <= 32 + 2 * 8
    with pytest.raises(InvalidParameter, match="tile size"):
        upscale.run_tiled(fn, x, 2, tile=8)


def test_scale_choices_run_the_model_as_often_as_needed(net_files):
    x4 = upscale.load_upscaler(net_files["compact-x4"])
    x2 = upscale.load_upscaler(net_files["realesrgan-x2"])
    image = noise_image(16, 10)
    assert upscale.upscale_image(x4, image, 2).size == (32, 20)  # x4, then down to x2
    assert upscale.upscale_image(x2, image, 4).size == (64, 40)  # two x2 passes
    assert upscale.upscale_image(None, image, 3).size == (48, 30)  # Lanczos alone
    with pytest.raises(InvalidParameter, match="upscale factor"):
        upscale.upscale_image(x4, image, 0.5)
    with pytest.raises(InvalidParameter, match="at most"):
        upscale.upscale_image(x4, Image.new("RGB", (4000, 4000)), 4)


def test_upscale_latents():
    latents = torch.randn(2, 4, 8, 8)
    out = upscale.upscale_latents(latents, 12, 16)
    assert out.shape == (2, 4, 16, 12) and out.dtype == latents.dtype
    nearest = upscale.upscale_latents(latents, 16, 16, "nearest")
    assert torch.equal(nearest[:, :, ::2, ::2], latents)
