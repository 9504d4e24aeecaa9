"""Textual-inversion embeddings: A1111 .safetensors/.pt formats, SDXL pairs, fitting a model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from malerei.engine.embeddings import list_embeddings, load_embedding, load_embeddings_for
from malerei.engine.errors import ModelLoadError, PickleRefused
from malerei.engine.loading import load_model


def vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_a1111_safetensors(tmp_path):
    path = tmp_path / "my-style.safetensors"
    v = vectors(3, 768)
    save_file({"emb_params": v}, str(path))
    embedding = load_embedding(path)
    assert embedding.name == "my-style" and embedding.n_vectors == 3 and not embedding.is_sdxl
    assert torch.equal(embedding.vectors, v)


def test_sdxl_pair(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280, 1)}, str(path))
    embedding = load_embedding(path)
    assert embedding.is_sdxl and embedding.n_vectors == 2
    assert embedding.vectors["clip_g"].shape == (2, 1280)
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(3, 1280)}, str(path))
    with pytest.raises(ModelLoadError, match="different numbers of vectors"):
        load_embedding(path)


def test_a1111_pt_needs_opt_in(tmp_path):
    path = tmp_path / "old.pt"
    v = vectors(2, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "old", "step": 3000}, path)
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        load_embedding(path)
    assert torch.equal(load_embedding(path, allow_pickle=True).vectors, v)


def test_cache_follows_the_file_and_the_pickle_rule(tmp_path):
    import os

    path = tmp_path / "e.safetensors"
    save_file({"emb_params": vectors(1, 8)}, str(path))
    first = load_embedding(path)
    assert load_embedding(path) is first
    save_file({"emb_params": vectors(2, 8, 1)}, str(path))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_embedding(path).n_vectors == 2
    pickled = tmp_path / "p.pt"
    torch.save({"emb_params": vectors(1, 8)}, pickled)
    assert load_embedding(pickled, allow_pickle=True).n_vectors == 1
    with pytest.raises(PickleRefused):  # a cached pickle is still refused without the opt-in
        load_embedding(pickled)


def test_diffusers_bin_single_vector(tmp_path):
    path = tmp_path / "token.bin"
    torch.save({"<cat-toy>": vectors(1, 768)[0]}, path)
    embedding = load_embedding(path, allow_pickle=True)
    assert embedding.name == "token" and embedding.vectors.shape == (1, 768)


def test_not_an_embedding(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2, 2), "b": torch.ones(2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a textual-inversion embedding"):
        load_embedding(path)
    torch.save({"string_to_param": {"*": vectors(1, 8), "#": vectors(1, 8)}}, tmp_path / "two.pt")
    with pytest.raises(ModelLoadError, match="holds 2 terms"):
        load_embedding(tmp_path / "two.pt", allow_pickle=True)


def test_embeddings_for_model(tiny_models_dir, tmp_path):
    model = load_model("tiny-sd1", models_dir=tiny_models_dir)
    found = load_embeddings_for(model)
    assert list(found.vectors) == ["tiny-emb"] and found.vectors["tiny-emb"].shape == (2, 32)
    assert [e.name for e in list_embeddings(tiny_models_dir)] == ["tiny-emb"]

    # an SDXL embedding and a corrupt file in the same folder are skipped, with reasons
    folder = tmp_path / "models"
    (folder / "embeddings").mkdir(parents=True)
    save_file({"emb_params": vectors(1, 32)}, str(folder / "embeddings" / "fits.safetensors"))
    save_file({"clip_l": vectors(1, 32), "clip_g": vectors(1, 64)}, str(folder / "embeddings" / "xl.safetensors"))
    (folder / "embeddings" / "broken.safetensors").write_bytes(b"\0" * 10)
    found = load_embeddings_for(model, models_dir=folder)
    assert list(found.vectors) == ["fits"]
    assert set(found.skipped) == {"xl", "broken"}
    assert "another model family" in found.skipped["xl"]
