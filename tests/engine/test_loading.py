"""Model loading: diffusers folders and original-layout single files of SD1/SD2/SDXL, the pickle
rule, corrupt files, the models folder, hashes, the model cache, and that nothing goes online."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from malerei.engine import model_dir
from malerei.engine.devices import MemoryOptions
from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound, PickleRefused
from malerei.engine.loading import LoadedModel, ModelCache, load_model
from malerei.engine.single_file import detect_family, unet_predicts_v

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_pipe(folder: Path):
    """The tiny folder loaded by diffusers alone: the reference malerei's results are compared to."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def references(tiny_models):
    return {family: reference_pipe(tiny_models[family].folder) for family in FAMILIES}


# ---------------------------------------------------------------------------------------------
# diffusers folders


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder(family, tiny_models, references, tmp_path):
    tiny = tiny_models[family]
    model = load_model(tiny.folder, models_dir=tmp_path)
    assert isinstance(model, LoadedModel)
    assert model.family == family
    assert model.name == tiny.folder.name and model.path == tiny.folder.resolve()
    assert model.prediction_type == tiny.prediction_type
    assert type(model.pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    for component in COMPONENTS[family]:
        assert_same_weights(getattr(model.pipe, component), getattr(references[family], component))
    unet_file = tiny.folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert model.short_hash == sha256(unet_file)[:10]
    assert model.file_hashes["unet/diffusion_pytorch_model.safetensors"] == sha256(unet_file)
    assert set(model.file_hashes) == {f"{c}/{p.name}" for c in COMPONENTS[family]
                                      for p in (tiny.folder / c).glob("*.safetensors")}
    assert model.defaults["width"] == model.defaults["height"] == 64  # sample size 8 x VAE factor 8


def test_folder_defaults_from_malerei_json(tiny_sd1, tmp_path):
    model = load_model(tiny_sd1.folder, models_dir=tmp_path)
    assert model.defaults == {"width": 64, "height": 64, "sampler": "Euler", "steps": 4, "cfg_scale": 5.0}


@pytest.mark.parametrize("content, message", [
    ({"steps": "many"}, "steps must be a int"),
    ({"width": 100}, "multiple of 8"),
    ({"seed": 3}, "unknown key 'seed'"),
])
def test_bad_malerei_json_is_refused(content, message, tiny_sd1, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1.folder, folder)
    (folder / "malerei.json").write_text(json.dumps(content))
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder, models_dir=tmp_path)


def test_folder_prediction_type_override(tiny_sd1, tmp_path):
    model = load_model(tiny_sd1.folder, models_dir=tmp_path, prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction"
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(InvalidParameter, match="allowed: epsilon, v_prediction"):
        load_model(tiny_sd1.folder, models_dir=tmp_path, prediction_type="x0")


def test_folder_with_pickle_weights_needs_opt_in(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd1.folder, folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(vae_file)), folder / "vae" / "diffusion_pytorch_model.bin")
    vae_file.unlink()
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        load_model(folder, models_dir=tmp_path)
    model = load_model(folder, models_dir=tmp_path, allow_pickle=True)
    assert "vae/diffusion_pytorch_model.bin" in model.file_hashes


def test_attention_uses_sdpa(tiny_sdxl, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = load_model(tiny_sdxl.file, models_dir=tmp_path, config_dir=tiny_sdxl.config_dir)
    for module in (model.pipe.unet, model.pipe.vae):
        processors = module.attn_processors.values()
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


# ---------------------------------------------------------------------------------------------
# single files


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(family, tiny_models, references, tmp_path):
    tiny = tiny_models[family]
    model = load_model(tiny.file, models_dir=tmp_path, config_dir=tiny.config_dir)
    assert model.family == family
    assert model.name == tiny.file.stem
    assert model.prediction_type == tiny.prediction_type
    for component in COMPONENTS[family]:
        assert_same_weights(getattr(model.pipe, component), getattr(references[family], component))
    assert model.short_hash == sha256(tiny.file)[:10]
    assert model.file_hashes == {tiny.file.name: sha256(tiny.file)}
    # real checkpoints carry no tokenizer: the CLIP BPE one is built from the shipped vocabulary
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tokenizer = getattr(model.pipe, name, None)
        if tokenizer is None:
            continue
        assert len(tokenizer) == 49408
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    if family in ("sd2", "sdxl"):  # OpenCLIP encoders pad with "!" (id 0)
        last = model.pipe.tokenizer_2 if family == "sdxl" else model.pipe.tokenizer
        assert last.pad_token == "!" and last.pad_token_id == 0


def test_family_detection_from_tensor_names():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert detect_family({**unet, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}) == "sd1"
    assert detect_family({**unet, "cond_stage_model.model.token_embedding.weight": (49408, 1024)}) == "sd2"
    assert detect_family({**unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                          "conditioner.embedders.1.model.positional_embedding": (77, 1280)}) == "sdxl"
    cases = [
        ({**unet, "conditioner.embedders.0.model.positional_embedding": (77, 1280)}, "refiner"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
          "cond_stage_model.transformer.text_model.x": (1,)}, "9 input channels"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
        ({"emb_params": (2, 768)}, "embedding"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE"),
        (unet, "no text encoder"),
    ]
    for shapes, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            detect_family(shapes)


def test_shipped_configs_describe_the_real_architectures(to_original_layout):
    """The shipped configs are the published models (SD1.5, SD2.x, SDXL base): built on the meta
    device they have the published parameter counts, and their weights under original single-file
    names (the fixture converter, the reverse of diffusers') pass family detection and the
    architecture check, while another family's config is refused."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from malerei.engine.single_file import CONFIG_ROOT, check_architecture

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    expected = {"sd1": (859_520_964, 123_060_480), "sd2": (865_910_724, 340_387_840),
                "sd2-v": (865_910_724, 340_387_840), "sdxl": (2_567_463_684, 123_060_480)}
    with init_empty_weights():
        for name, (unet_params, text_params) in expected.items():
            root = CONFIG_ROOT / name
            parts = SimpleNamespace(
                unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")),
                vae=AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
                text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
            )
            assert count(parts.unet) == unet_params
            assert count(parts.vae) == 83_653_863
            assert count(parts.text_encoder) == text_params
            family = name.removesuffix("-v")
            if family == "sdxl":
                parts.text_encoder_2 = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
                assert count(parts.text_encoder_2) == 694_659_840
            shapes = {k: tuple(v.shape) for k, v in to_original_layout(parts, family).items()}
            assert detect_family(shapes) == family
            check_architecture(shapes, family, root, name=name)
            if family != "sdxl":  # SD1 weights against the SD2 config and vice versa
                other = CONFIG_ROOT / ("sd2" if family == "sd1" else "sd1")
                with pytest.raises(ModelLoadError, match="does not match.*UNet context width"):
                    check_architecture(shapes, family, other, name=name)


def test_clip_bpe_tokenizer_gives_clip_ids(tmp_path):
    from transformers import CLIPTokenizer

    from malerei.engine.clip_bpe import build_clip_tokenizer, write_clip_tokenizer_files

    tokenizer = build_clip_tokenizer()
    expected = {
        "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
        "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
        "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
        "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    }
    for text, ids in expected.items():
        assert tokenizer(text).input_ids == ids, text
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    assert build_clip_tokenizer(pad_token="!").pad_token_id == 0
    reloaded = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(tmp_path / "tok")), local_files_only=True)
    assert reloaded("a photo of a dog").input_ids == expected["a photo of a dog"]


def test_non_standard_architecture_needs_config_dir(tiny_sd1, tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not match the sd1 architecture.*UNet base channels 8, expected 320.*config_dir"):
        load_model(tiny_sd1.file, models_dir=tmp_path)


def test_old_sd1_text_encoder_names(tiny_sd1, references, tmp_path):
    """Old SD1 files name CLIP without `text_model.` and carry position_ids; both are handled."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_sd1.file))
    old_prefix, new_prefix = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    state = {(new_prefix + k[len(old_prefix):] if k.startswith(old_prefix) else k): v for k, v in state.items()}
    state["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None]  # a broken float one
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    model = load_model(path, models_dir=tmp_path, config_dir=tiny_sd1.config_dir)
    assert_same_weights(model.pipe.text_encoder, references["sd1"].text_encoder)


def test_single_file_prediction_type_rules(tiny_sd1, tiny_sd2, tmp_path):
    from safetensors.torch import load_file, save_file

    # explicit override wins
    model = load_model(tiny_sd1.file, models_dir=tmp_path, config_dir=tiny_sd1.config_dir, prediction_type="v")
    assert model.prediction_type == "v_prediction" == model.pipe.scheduler.config.prediction_type
    # a sidecar yaml saying eps beats the SD2 test run
    copy = tmp_path / "sd2-eps.safetensors"
    shutil.copy2(tiny_sd2.file, copy)
    copy.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_model(copy, models_dir=tmp_path, config_dir=tiny_sd2.config_dir).prediction_type == "epsilon"
    # the v_pred marker tensor (v-pred SDXL/SD1 fine-tunes), and ztsnr
    state = load_file(str(tiny_sd1.file))
    state["v_pred"] = torch.tensor([])
    state["ztsnr"] = torch.tensor([])
    marked = tmp_path / "marked.safetensors"
    save_file(state, str(marked))
    model = load_model(marked, models_dir=tmp_path, config_dir=tiny_sd1.config_dir)
    assert model.prediction_type == "v_prediction"
    assert model.pipe.scheduler.config.rescale_betas_zero_snr is True
    # SD1 without any marker: epsilon
    assert load_model(tiny_sd1.file, models_dir=tmp_path, config_dir=tiny_sd1.config_dir).prediction_type == "epsilon"


@pytest.mark.parametrize("bias, expected", [(-5.0, "v_prediction"), (0.5, "epsilon")])
def test_sd2_without_marker_runs_a1111_test(bias, expected, tiny_sd2, tmp_path):
    """The SD2 decision without override/yaml/marker: the UNet is run at t=999 (A1111's test).
    Zeroing the UNet's last conv and setting its bias fixes its output, so the answer is known."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_sd2.file))
    state["model.diffusion_model.out.2.weight"] = torch.zeros_like(state["model.diffusion_model.out.2.weight"])
    state["model.diffusion_model.out.2.bias"] = torch.full_like(state["model.diffusion_model.out.2.bias"], bias)
    path = tmp_path / "sd2-unmarked.safetensors"  # no sidecar yaml
    save_file(state, str(path))
    model = load_model(path, models_dir=tmp_path, config_dir=tiny_sd2.config_dir)
    assert model.prediction_type == expected
    assert unet_predicts_v(model.pipe.unet) is (expected == "v_prediction")


# ---------------------------------------------------------------------------------------------
# pickles, corrupt and missing files


def test_pickle_checkpoint_needs_opt_in(tiny_sd1, references, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1.file)), "global_step": 1}, ckpt)
    with pytest.raises(PickleRefused) as refused:
        load_model(ckpt, models_dir=tmp_path, config_dir=tiny_sd1.config_dir)
    assert "--allow-pickle" in str(refused.value) and "\n" not in str(refused.value)
    model = load_model(ckpt, models_dir=tmp_path, config_dir=tiny_sd1.config_dir, allow_pickle=True)
    assert_same_weights(model.pipe.unet, references["sd1"].unet)


class _Payload:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, ckpt)
    # the payload is real: an unrestricted unpickler runs it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(PickleRefused, match="--allow-pickle"):
        load_model(ckpt, models_dir=tmp_path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="weights_only") as refused:
        load_model(ckpt, models_dir=tmp_path, allow_pickle=True)
    assert not isinstance(refused.value, PickleRefused)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad_header"])
def test_corrupt_safetensors(damage, tiny_sd1, tmp_path):
    path = tmp_path / f"{damage}.safetensors"
    data = tiny_sd1.file.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(4096),
        "empty": b"",
        "bad_header": (20).to_bytes(8, "little") + b"{not json at all!!}" + b"\0" * 64,
    }[damage])
    with pytest.raises(ModelLoadError) as error:
        load_model(path, models_dir=tmp_path)
    message = str(error.value)
    assert "not a valid .safetensors file" in message and "\n" not in message


def test_missing_and_unknown_models(tiny_models_dir, tmp_path):
    with pytest.raises(ModelNotFound, match="no such file"):
        load_model(tmp_path / "nothing.safetensors", models_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="available: tiny-sd1, tiny-sd1-file"):
        load_model("no-such-model", models_dir=tiny_models_dir)
    with pytest.raises(ModelNotFound, match="has no models"):
        load_model("anything", models_dir=tmp_path / "empty")


def test_builtin_model_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(model_dir, "BUILTIN_MODEL_DIR", tmp_path / "shapes")
    with pytest.raises(ModelNotFound, match="built-in model is not installed"):
        load_model(None, models_dir=tmp_path)


def test_builtin_model_present(monkeypatch, tiny_sd1, tmp_path):
    monkeypatch.setattr(model_dir, "BUILTIN_MODEL_DIR", tiny_sd1.folder)
    assert model_dir.resolve_model(None) == tiny_sd1.folder
    assert load_model(None, models_dir=tmp_path).name == tiny_sd1.folder.name


# ---------------------------------------------------------------------------------------------
# models folder


def test_models_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MALEREI_MODELS_DIR", raising=False)
    default = model_dir.default_models_dir()
    assert default.name == "models" and "malerei" in str(default)
    monkeypatch.setenv("MALEREI_MODELS_DIR", str(tmp_path / "mine"))
    assert model_dir.default_models_dir() == tmp_path / "mine"


def test_list_models(tiny_models_dir, tiny_sd1):
    entries = model_dir.list_models(tiny_models_dir)
    assert [(e.name, e.kind, e.family_if_cheap) for e in entries] == [
        ("tiny-sd1", "diffusers", "sd1"), ("tiny-sd1-file", "checkpoint", "sd1")]
    by_name = {e.name: e for e in entries}
    assert by_name["tiny-sd1-file"].short_hash == sha256(tiny_sd1.file)[:10]
    assert by_name["tiny-sd1"].short_hash == sha256(tiny_sd1.folder / "unet" / "diffusion_pytorch_model.safetensors")[:10]
    assert [(e.name, e.kind) for e in model_dir.list_loras(tiny_models_dir)] == [
        ("tiny-kohya", "lora"), ("tiny-peft", "lora")]
    assert [(e.name, e.kind) for e in model_dir.list_embedding_files(tiny_models_dir)] == [("tiny-emb", "embedding")]


def test_resolve_model_names_and_paths(tiny_models_dir, tiny_sd1, tmp_path):
    root = tiny_models_dir
    assert model_dir.resolve_model("tiny-sd1", root) == root / "tiny-sd1"
    assert model_dir.resolve_model("tiny-sd1-file", root) == root / "tiny-sd1-file.safetensors"
    assert model_dir.resolve_model("tiny-sd1-file.safetensors", root) == root / "tiny-sd1-file.safetensors"
    assert model_dir.resolve_model(str(root / "tiny-sd1"), tmp_path) == (root / "tiny-sd1").resolve()
    model = load_model("tiny-sd1-file", models_dir=root, config_dir=tiny_sd1.config_dir)
    assert model.defaults["steps"] == 3  # <stem>.malerei.json next to a single file
    assert model.models_dir == root


def test_ambiguous_name(tiny_sd1, tmp_path):
    shutil.copy2(tiny_sd1.file, tmp_path / "twin.safetensors")
    (tmp_path / "Stable-diffusion").mkdir()
    shutil.copy2(tiny_sd1.file, tmp_path / "Stable-diffusion" / "twin.safetensors")
    with pytest.raises(InvalidParameter, match="ambiguous"):
        model_dir.resolve_model("twin", tmp_path)


def test_hash_cache_reuses_and_invalidates(monkeypatch, tiny_sd1, tmp_path):
    path = tmp_path / "m.safetensors"
    shutil.copy2(tiny_sd1.file, path)
    calls = []
    real = model_dir._sha256_file
    monkeypatch.setattr(model_dir, "_sha256_file", lambda p: calls.append(p) or real(p))
    first = model_dir.list_models(tmp_path)[0].short_hash
    assert (tmp_path / model_dir.HASH_CACHE_NAME).is_file()
    model_dir._caches.clear()  # a new process: the cache comes from the JSON file
    assert model_dir.list_models(tmp_path)[0].short_hash == first
    assert len(calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    model_dir.list_models(tmp_path)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# ModelCache


def test_model_cache_reuses_and_evicts(tiny_sd1, tiny_sd2, tmp_path):
    cache = ModelCache(max_models=1)
    first = cache.get(tiny_sd1.folder, models_dir=tmp_path)
    assert cache.get(tiny_sd1.folder, models_dir=tmp_path) is first
    other = cache.get(tiny_sd1.folder, models_dir=tmp_path, memory=MemoryOptions(vae_tiling=True))
    assert other is not first and len(cache) == 1  # different options: another entry; LRU evicted
    assert cache.models() == [other]
    assert cache.get(tiny_sd1.folder, models_dir=tmp_path) is not first  # reloaded after eviction
    with pytest.raises(InvalidParameter):
        ModelCache(max_models=0)


def test_model_cache_loads_once_under_concurrency(tiny_sd1, tmp_path):
    loads = []
    started = threading.Event()

    def slow_loader(ref, **kwargs):
        loads.append(ref)
        started.set()
        threading.Event().wait(0.2)
        return object()

    cache = ModelCache(max_models=2, loader=slow_loader)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(tiny_sd1.folder, models_dir=tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(results) == 4 and all(r is results[0] for r in results)


def test_model_cache_key_follows_file_changes(tiny_sd1, tmp_path):
    path = tmp_path / "m.safetensors"
    shutil.copy2(tiny_sd1.file, path)
    cache = ModelCache()
    key = cache.key(path, models_dir=tmp_path)
    assert cache.key(path, models_dir=tmp_path) == key
    assert cache.key(path, models_dir=tmp_path, dtype="bf16") != key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.key(path, models_dir=tmp_path) != key


# ---------------------------------------------------------------------------------------------
# offline


def test_loading_opens_no_socket(no_network, tiny_models, tiny_lora_files, tiny_models_dir, tmp_path):
    from malerei.engine.embeddings import load_embedding
    from malerei.engine.lora import lora_applied

    for tiny in tiny_models.values():
        load_model(tiny.folder, models_dir=tmp_path)
        load_model(tiny.file, models_dir=tmp_path, config_dir=tiny.config_dir)
    model = load_model("tiny-sd1", models_dir=tiny_models_dir)
    with lora_applied(model, [("tiny-kohya", 1.0), (tiny_lora_files["diffusers"], 0.5)]):
        pass
    load_embedding(tiny_models_dir / "embeddings" / "tiny-emb.safetensors")
    model_dir.list_models(tiny_models_dir)
    assert no_network == []


def test_no_network_fixture_catches_connections(no_network):
    import socket

    with pytest.raises(OSError, match="offline"):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1
