"""Restoration: GFPGAN and CodeFormer in their real file formats, strength blending, tiling."""

from __future__ import annotations

import image_nets
import numpy as np
import pytest
import torch
from PIL import Image

from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound
from malerei.restore import load_restorer, restore_image

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    """GFPGANv1.4-style and CodeFormer-style files in a models folder (A1111's GFPGAN/, Codeformer/)."""
    root = tmp_path_factory.mktemp("faces")
    return {
        "gfpgan": image_nets.save(image_nets.gfpgan_state(), root / "GFPGAN" / "GFPGANv1.4.pth"),
        "codeformer": image_nets.save(image_nets.codeformer_state(), root / "Codeformer" / "codeformer-v0.1.0.pth"),
        "root": root,
    }


def picture(size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def test_gfpgan_and_codeformer_load_by_name_in_their_real_formats(face_models):
    gfpgan = load_restorer("GFPGANv1.4", models_dir=face_models["root"], allow_pickle=True)
    assert (gfpgan.architecture, gfpgan.purpose, gfpgan.scale, gfpgan.square_input) == ("GFPGAN", "FaceSR", 1, 512)
    codeformer = load_restorer("codeformer-v0.1.0", models_dir=face_models["root"], allow_pickle=True)
    assert (codeformer.architecture, codeformer.purpose, codeformer.square_input) == ("CodeFormer", "FaceSR", 512)


def test_an_upscaler_is_not_a_restorer(tmp_path):
    path = image_nets.save(image_nets.compact_state(4), tmp_path / "x4.safetensors")
    with pytest.raises(ModelLoadError, match="is not a restorer"):
        load_restorer(path)
    with pytest.raises(ModelNotFound, match="no restorer named"):
        load_restorer("GFPGANv9", models_dir=tmp_path)


def test_strength_mixes_input_and_output(tmp_path):
    path = image_nets.save(image_nets.compact_state(1), tmp_path / "1x-denoise.safetensors")
    model = load_restorer(path)
    assert model.purpose == "Restoration" and model.square_input is None
    source = picture()
    full = np.asarray(restore_image(model, source, strength=1.0)).astype(int)
    none = np.asarray(restore_image(model, source, strength=0.0)).astype(int)
    half = np.asarray(restore_image(model, source, strength=0.5)).astype(int)
    assert np.array_equal(none, np.asarray(source))
    assert np.abs(full - np.asarray(source)).mean() > 5
    assert np.abs(half - (full + none) / 2).max() <= 1
    tiled = np.asarray(restore_image(model, source, strength=1.0, tile=16, overlap=8)).astype(int)
    assert np.abs(tiled - full).max() <= 1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidParameter, match="restore strength"):
            restore_image(model, source, strength=bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gfpgan", "codeformer"])
def test_face_models_restore_whole_images(face_models, name):
    model = load_restorer(face_models[name], allow_pickle=True)
    source = picture((48, 32))
    out = restore_image(model, source, strength=0.7)
    assert out.size == source.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(source))
