"""Shared fixtures: tiny Stable Diffusion models in real file formats, built offline in seconds.

Every tiny model has the real component classes and key layout of its family, with tiny widths
(UNet channels 8/16, text encoders 32/64 wide with 2 layers, a 4-block VAE with the real 8x
downscale), random weights (seeded), and CLIP's full 49,408-token vocabulary size so both the
word-level test tokenizer and the real CLIP BPE tokenizer work with them. Native size: 64 px.

Session fixtures (built once per test run, read-only: copy before changing them):

    tiny_sd1, tiny_sd2, tiny_sdxl -> TinyModel
        .family           "sd1" | "sd2" | "sdxl"
        .prediction_type  "epsilon" (sd1, sdxl) | "v_prediction" (sd2)
        .folder           diffusers folder (model_index.json, safetensors weights, word-level
                          tokenizer(s), scheduler config; sd1 also has a malerei.json)
        .file             the same weights as one original-layout (CompVis/SGM) .safetensors,
                          as A1111/ComfyUI keep them (sd2 has a sidecar <stem>.yaml saying "v")
        .config_dir       diffusers configs of the tiny architecture, no weights and no tokenizer:
                          pass it to load the single file:
                              load_model(tiny_sd1.file, config_dir=tiny_sd1.config_dir)
                          (the single file then gets the real CLIP BPE tokenizer)
    tiny_models           {"sd1": TinyModel, "sd2": ..., "sdxl": ...}
    tiny_lora_files       {"kohya": Path, "diffusers": Path}: LoRAs for tiny_sd1 (UNet attention
                          and text-encoder attention layers), both layouts, .safetensors
    tiny_models_dir       a models folder: tiny-sd1/ (diffusers), tiny-sd1-file.safetensors
                          (+ .malerei.json), Lora/tiny-kohya.safetensors, Lora/tiny-peft.safetensors,
                          embeddings/tiny-emb.safetensors (A1111 emb_params, 2 x 32 for sd1)

    to_original_layout    the converter below, as a fixture: to_original_layout(pipe, family)

Function fixtures:

    no_network            sockets refuse to connect (socket.connect, connect_ex, create_connection);
                          the attempts are recorded in the returned list.

Builders usable from tests: `build_tiny_pipeline(family, tokenizer_dir)` and
`diffusers_to_original(pipe, family)` (the reverse of diffusers' single-file conversion).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from malerei.engine.offline import enforce_offline

enforce_offline()  # before diffusers/transformers are first imported by any test

# One intra-op thread per process: tests start servers and CLI subprocesses beside the test
# process, and on a 2-core machine competing thread pools ran tiny models 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_WORDS = [
    "a", "photo", "of", "cat", "dog", "red", "green", "blue", "circle", "square", "triangle",
    "on", "background", "small", "big", "and", "the",
]
TEXT_WIDTHS = {"sd1": (32,), "sd2": (32,), "sdxl": (32, 64)}  # per text encoder; SDXL's differ, as in the real one
VOCAB_SIZE = 49408  # CLIP's; lets the real BPE tokenizer and the word-level one both work


# ---------------------------------------------------------------------------------------------
# building tiny pipelines


def _tokenizer(out_dir: Path, pad_token: str):
    """Word-level CLIP tokenizer (malerei.engine.tokenizer_builder), or the full CLIP BPE files."""
    try:
        from malerei.engine.tokenizer_builder import build_word_clip_tokenizer
    except ImportError:  # colleague's module not there: write the real CLIP BPE tokenizer instead
        from transformers import CLIPTokenizer

        from malerei.engine.clip_bpe import write_clip_tokenizer_files

        write_clip_tokenizer_files(out_dir)
        return CLIPTokenizer.from_pretrained(str(out_dir), pad_token=pad_token, model_max_length=77)
    return build_word_clip_tokenizer(TINY_WORDS, out_dir, pad_token=pad_token)


def _text_encoder(width: int, *, act: str, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=VOCAB_SIZE, max_position_embeddings=77, projection_dim=32, hidden_act=act,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as in the published SD configs
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_tiny_pipeline(family: str, tokenizer_dir: Path, *, seed: int = 0):
    """A tiny random StableDiffusionPipeline (sd1, sd2) or StableDiffusionXLPipeline (sdxl)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    widths = TEXT_WIDTHS[family]
    unet_common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        norm_num_groups=4,
    )
    if family == "sd1":
        unet = UNet2DConditionModel(
            **unet_common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=widths[0],
            attention_head_dim=2,
        )
    elif family == "sd2":
        unet = UNet2DConditionModel(
            **unet_common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=widths[0],
            attention_head_dim=(2, 4), use_linear_projection=True,
        )
    else:
        unet = UNet2DConditionModel(
            **unet_common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=sum(widths),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family == "sd1":
        te = _text_encoder(widths[0], act="quick_gelu", with_projection=False)
        tok = _tokenizer(tokenizer_dir / "tokenizer", "<|endoftext|>")
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet.eval(),
            scheduler=PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sd2":
        te = _text_encoder(widths[0], act="gelu", with_projection=False)
        tok = _tokenizer(tokenizer_dir / "tokenizer", "!")
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet.eval(),
            scheduler=DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False,
                                    prediction_type="v_prediction"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    te = _text_encoder(widths[0], act="quick_gelu", with_projection=False)
    te2 = _text_encoder(widths[1], act="gelu", with_projection=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2,
        tokenizer=_tokenizer(tokenizer_dir / "tokenizer", "<|endoftext|>"),
        tokenizer_2=_tokenizer(tokenizer_dir / "tokenizer_2", "!"),
        unet=unet.eval(), scheduler=EulerDiscreteScheduler(**schedule), force_zeros_for_empty_prompt=True,
    )


# ---------------------------------------------------------------------------------------------
# diffusers -> original (CompVis / SGM) layout: the reverse of diffusers' single-file conversion

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)


def _rename_all(sd: dict, old_prefix: str, new_prefix: str, out: dict, renames=()) -> None:
    for key in [k for k in sd if k.startswith(old_prefix)]:
        rest = key[len(old_prefix):]
        for old, new in renames:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
        out[new_prefix + rest] = sd.pop(key)


def _unet_to_ldm(unet) -> dict:
    sd = dict(unet.state_dict())
    cfg = unet.config
    out: dict = {}
    n_blocks = len(cfg.block_out_channels)
    lpb = cfg.layers_per_block
    for new, old in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                     ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
                     ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")):
        _rename_all(sd, old + ".", new + ".", out)
    for b in range(n_blocks):
        for layer in range(lpb):
            i = 1 + b * (lpb + 1) + layer
            _rename_all(sd, f"down_blocks.{b}.resnets.{layer}.", f"input_blocks.{i}.0.", out, _RESNET_TO_LDM)
            _rename_all(sd, f"down_blocks.{b}.attentions.{layer}.", f"input_blocks.{i}.1.", out)
        _rename_all(sd, f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.", out)
    _rename_all(sd, "mid_block.resnets.0.", "middle_block.0.", out, _RESNET_TO_LDM)
    _rename_all(sd, "mid_block.attentions.0.", "middle_block.1.", out)
    _rename_all(sd, "mid_block.resnets.1.", "middle_block.2.", out, _RESNET_TO_LDM)
    for b in range(n_blocks):
        has_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
        for layer in range(lpb + 1):
            i = b * (lpb + 1) + layer
            _rename_all(sd, f"up_blocks.{b}.resnets.{layer}.", f"output_blocks.{i}.0.", out, _RESNET_TO_LDM)
            _rename_all(sd, f"up_blocks.{b}.attentions.{layer}.", f"output_blocks.{i}.1.", out)
        last = b * (lpb + 1) + lpb
        upsampler = f"output_blocks.{last}.{2 if has_attention else 1}.conv."
        _rename_all(sd, f"up_blocks.{b}.upsamplers.0.conv.", upsampler, out)
    assert not sd, f"unconverted UNet keys: {sorted(sd)[:5]}"
    return out


def _vae_to_ldm(vae) -> dict:
    sd = dict(vae.state_dict())
    out: dict = {}
    n = len(vae.config.block_out_channels)
    shortcut = (("conv_shortcut", "nin_shortcut"),)
    for part in ("encoder", "decoder"):
        _rename_all(sd, f"{part}.conv_norm_out.", f"{part}.norm_out.", out)
        for k in (1, 2):
            _rename_all(sd, f"{part}.mid_block.resnets.{k - 1}.", f"{part}.mid.block_{k}.", out, shortcut)
        attn = {}
        _rename_all(sd, f"{part}.mid_block.attentions.0.", "", attn)
        for key, value in attn.items():
            new = (key.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                   .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if new.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
            out[f"{part}.mid.attn_1.{new}"] = value
    for i in range(n):
        for j in range(vae.config.layers_per_block):
            _rename_all(sd, f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", out, shortcut)
        _rename_all(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", out)
        for j in range(vae.config.layers_per_block + 1):
            _rename_all(sd, f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", out, shortcut)
        _rename_all(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", out)
    for key in list(sd):  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        out[key] = sd.pop(key)
    return out


def _text_model_keys(encoder) -> dict:
    """state dict with `text_model.` names (transformers >= 5.6 flattened CLIPTextModel)."""
    out = {}
    for key, value in encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection")):
            key = "text_model." + key
        out[key] = value
    return out


def _openclip_keys(encoder, prefix: str) -> dict:
    import torch

    sd = _text_model_keys(encoder)
    width = encoder.config.hidden_size
    out = {
        prefix + "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    projection = sd.pop("text_projection.weight", None)
    # OpenCLIP keeps x @ text_projection ([width, proj]); SD2's unused one is kept for realism.
    out[prefix + "text_projection"] = (
        projection.T.contiguous() if projection is not None else torch.randn(width, encoder.config.projection_dim)
    )
    for layer in range(encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = sd.pop(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = sd.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = sd.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = sd.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = sd.pop(f"{src}mlp.fc2.{kind}")
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    assert not sd, f"unconverted text encoder keys: {sorted(sd)[:5]}"
    return out


def diffusers_to_original(pipe, family: str) -> dict:
    """All weights of a diffusers SD1/SD2/SDXL pipeline under their original single-file names."""
    out = {f"model.diffusion_model.{k}": v for k, v in _unet_to_ldm(pipe.unet).items()}
    out.update({f"first_stage_model.{k}": v for k, v in _vae_to_ldm(pipe.vae).items()})
    if family == "sd1":
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in _text_model_keys(pipe.text_encoder).items()})
    elif family == "sd2":
        out.update(_openclip_keys(pipe.text_encoder, "cond_stage_model.model."))
    else:
        out.update({f"conditioner.embedders.0.transformer.{k}": v
                    for k, v in _text_model_keys(pipe.text_encoder).items()})
        out.update(_openclip_keys(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# fixtures


@dataclass(frozen=True)
class TinyModel:
    family: str
    prediction_type: str
    folder: Path
    file: Path
    config_dir: Path


def _write_config_dir(folder: Path, config_dir: Path) -> None:
    """Copy the JSON configs (not weights, not tokenizers) of a diffusers folder."""
    for src in folder.rglob("*.json"):
        rel = src.relative_to(folder)
        if rel.parts[0].startswith("tokenizer") or rel.name == "malerei.json":
            continue
        (config_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, config_dir / rel)


def _build_tiny_model(family: str, root: Path) -> TinyModel:
    from safetensors.torch import save_file

    work = root / family
    folder, config_dir = work / f"tiny-{family}", work / f"tiny-{family}-config"
    pipe = build_tiny_pipeline(family, work / "tokenizers")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if family == "sd1":
        (folder / "malerei.json").write_text(json.dumps({"sampler": "Euler", "steps": 4, "cfg_scale": 5.0}))
    _write_config_dir(folder, config_dir)
    file = work / f"tiny-{family}-file.safetensors"
    save_file(diffusers_to_original(pipe, family), str(file), metadata={"format": "pt"})
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    if family == "sd2":  # A1111's sidecar config, which is how users mark a v model
        file.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    return TinyModel(family=family, prediction_type=prediction, folder=folder, file=file, config_dir=config_dir)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> TinyModel:
    return _build_tiny_model("sd1", tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> TinyModel:
    return _build_tiny_model("sd2", tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> TinyModel:
    return _build_tiny_model("sdxl", tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_models(tiny_sd1, tiny_sd2, tiny_sdxl) -> dict[str, TinyModel]:
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


# LoRA targets in the tiny SD1 model, as kohya-ss trains them: whole attention blocks (q, k, v,
# out) and MLP layers of the UNet's transformer blocks and of the text encoder.
TINY_LORA_UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
)
TINY_LORA_TE_TARGETS = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.k_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layers.0.self_attn.out_proj",
    "encoder.layers.1.mlp.fc1",
)


def _kohya_lora(pipe, rank: int = 2) -> dict:
    """kohya-ss layout: lora_unet_<module path with _>.lora_down/.lora_up/.alpha."""
    import torch

    gen = torch.Generator().manual_seed(1)
    out = {}
    modules = [("lora_unet_", pipe.unet, name) for name in TINY_LORA_UNET_TARGETS]
    modules += [("lora_te_", pipe.text_encoder, name) for name in TINY_LORA_TE_TARGETS]
    for prefix, root, name in modules:
        layer = root.get_submodule(name)
        kohya_name = prefix + ("text_model." + name if prefix == "lora_te_" else name).replace(".", "_")
        out[f"{kohya_name}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.5
        out[f"{kohya_name}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.5
        out[f"{kohya_name}.alpha"] = torch.tensor(1.0)  # kohya's default: scale alpha/rank = 0.5
    return out


def _peft_lora(pipe, rank: int = 2) -> dict:
    """diffusers/peft layout: unet.<module>.lora_A.weight / lora_B.weight (+ text_encoder.)."""
    import torch

    gen = torch.Generator().manual_seed(2)
    out = {}
    modules = [("unet.", pipe.unet, name) for name in TINY_LORA_UNET_TARGETS]
    modules += [("text_encoder.", pipe.text_encoder, name) for name in TINY_LORA_TE_TARGETS]
    for prefix, root, name in modules:
        layer = root.get_submodule(name)
        key = prefix + ("text_model." + name if prefix == "text_encoder." else name)
        out[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.5
        out[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.5
    return out


@pytest.fixture(scope="session")
def tiny_lora_files(tiny_sd1, tmp_path_factory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_sd1.folder), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    root = tmp_path_factory.mktemp("tiny-loras")
    files = {"kohya": root / "tiny-kohya.safetensors", "diffusers": root / "tiny-peft.safetensors"}
    save_file(_kohya_lora(pipe), str(files["kohya"]))
    save_file(_peft_lora(pipe), str(files["diffusers"]))
    return files


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_sd1, tiny_lora_files, tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_sd1.folder, root / "tiny-sd1")
    shutil.copy2(tiny_sd1.file, root / "tiny-sd1-file.safetensors")
    (root / "tiny-sd1-file.malerei.json").write_text(json.dumps({"steps": 3}))
    (root / "Lora").mkdir()
    shutil.copy2(tiny_lora_files["kohya"], root / "Lora" / "tiny-kohya.safetensors")
    shutil.copy2(tiny_lora_files["diffusers"], root / "Lora" / "tiny-peft.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))},
              str(root / "embeddings" / "tiny-emb.safetensors"))
    return root


@pytest.fixture(scope="session")
def to_original_layout():
    """`diffusers_to_original(pipe, family)`: a pipeline's weights under single-file names."""
    return diffusers_to_original


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Make every socket connection fail (and record it): proves code under test stays offline."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access attempted in a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
