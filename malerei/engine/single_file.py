"""Single-file checkpoints in the original CompVis/SGM layout (A1111 / ComfyUI model files).

Such a file holds every weight under its original names:

| family | UNet                      | VAE                  | text encoder(s)                                           |
| ------ | ------------------------- | -------------------- | --------------------------------------------------------- |
| sd1    | `model.diffusion_model.*` | `first_stage_model.*` | `cond_stage_model.transformer.text_model.*` (OpenAI CLIP-L, HF names) |
| sd2    | same                      | same                 | `cond_stage_model.model.*` (OpenCLIP ViT-H, fused q/k/v)  |
| sdxl   | same (+ `label_emb`)      | same                 | `conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP bigG) |

Conversion to diffusers is diffusers' own (`from_single_file` for the UNet and VAE, its CLIP
converter for the text encoders), run offline against a local config folder. By default that is
the shipped folder for the detected family (`configs/sd1`, `sd2`, `sd2-v`, `sdxl`: the published
architectures). The checkpoint is checked against it first; a checkpoint of another shape (a
pruned or experimental architecture, or the tiny test models) is refused with a clear message
unless the caller passes `config_dir`, a diffusers-format folder (model_index.json + unet/ vae/
text_encoder[_2]/ configs; optional scheduler/ and tokenizer/) describing it. Architectures are
never guessed from tensor shapes, since head counts cannot be read from them and a wrong guess
gives silently wrong images.

Prediction type (epsilon or v), first match wins:
1. the caller's `prediction_type`;
2. a sidecar `<file stem>.yaml` (A1111's rule) with `model.params.parameterization: "v"`;
3. a `v_pred` tensor in the checkpoint (the marker ComfyUI and v-pred SDXL fine-tunes use);
4. SD2 only: A1111's test run (`unet_predicts_v`): at t=999 with a constant input, an epsilon
   UNet predicts roughly its input, a v UNet a value far below it. SD 2.x 768-v checkpoints are
   v, 512-base ones epsilon; the file names don't say which;
5. otherwise epsilon (SD1, SDXL).
A `ztsnr` tensor (zero-terminal-SNR training) sets `rescale_betas_zero_snr` in the scheduler config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from malerei.engine.errors import InvalidParameter, ModelLoadError

CONFIG_ROOT = Path(__file__).parent / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."

# pad tokens of the published tokenizers, per text encoder (see clip_bpe.py)
_PAD_TOKENS = {"sd1": ("<|endoftext|>",), "sd2": ("!",), "sdxl": ("<|endoftext|>", "!")}


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(shapes: Mapping[str, tuple[int, ...]], *, name: str = "checkpoint") -> str:
    """'sd1' | 'sd2' | 'sdxl' from tensor names (and the UNet's input channels); ModelLoadError for
    anything else, saying what the file looks like. `shapes` maps tensor name -> shape."""
    keys = shapes.keys()
    if not _has_prefix(keys, UNET_PREFIX):
        if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k for k in keys):
            hint = "it looks like a LoRA; put it in the models folder's Lora/ and use <lora:name:weight>"
        elif any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
            hint = "it looks like a textual-inversion embedding; put it in the models folder's embeddings/"
        elif _has_prefix(keys, "encoder.") and _has_prefix(keys, "decoder."):
            hint = "it looks like a VAE on its own, which is not a full model"
        else:
            hint = "no UNet weights (model.diffusion_model.*) found"
        raise ModelLoadError(f"{name} is not a Stable Diffusion checkpoint: {hint}")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelLoadError(
            f"{name}: its UNet takes {conv_in[1]} input channels; only text-to-image checkpoints "
            "with 4 latent channels are supported (inpainting / instruct-pix2pix models are not)"
        )
    if _has_prefix(keys, "conditioner.embedders."):
        if _has_prefix(keys, SDXL_OPENCLIP_PREFIX) and _has_prefix(keys, SDXL_CLIP_PREFIX):
            return "sdxl"
        if _has_prefix(keys, SDXL_REFINER_PREFIX):
            raise ModelLoadError(f"{name} is an SDXL refiner checkpoint; only SDXL base models are supported")
        raise ModelLoadError(f"{name}: SDXL-style checkpoint without both text encoders; not supported")
    if _has_prefix(keys, SD2_OPENCLIP_PREFIX):
        return "sd2"
    if _has_prefix(keys, SD1_CLIP_PREFIX):
        return "sd1"
    raise ModelLoadError(
        f"{name} has no text encoder weights (cond_stage_model.* / conditioner.*); UNet-only files "
        "are not supported as models"
    )


def try_detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """detect_family, or None where it would raise."""
    try:
        return detect_family(shapes)
    except ModelLoadError:
        return None


def normalize_checkpoint(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Name fixes real checkpoints need before diffusers' converter sees them:
    - old SD1 files name the CLIP text model without `text_model.` (transformers < 4.x layout);
    - `position_ids` buffers are dropped: not weights, and broken (float, off by one) in some merges.
    """
    fixed: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key.startswith(SD1_CLIP_PREFIX) and not key.startswith(SD1_CLIP_PREFIX + "text_model."):
            key = SD1_CLIP_PREFIX + "text_model." + key[len(SD1_CLIP_PREFIX) :]
        fixed[key] = value
    return fixed


def sidecar_parameterization(checkpoint: Path) -> str | None:
    """prediction type from an A1111-style `<stem>.yaml` next to the checkpoint, if it says."""
    yaml_path = checkpoint.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{yaml_path.name}: cannot be read as YAML ({type(exc).__name__})") from exc
    try:
        value = data["model"]["params"].get("parameterization")
    except (KeyError, TypeError, AttributeError):
        return None
    if value is None:
        return None
    if value == "v":
        return "v_prediction"
    if value == "eps":
        return "epsilon"
    raise ModelLoadError(f"{yaml_path.name}: parameterization {value!r} is not supported; allowed: eps, v")


def check_prediction_type(value: str | None) -> str | None:
    if value is None:
        return None
    aliases = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    if value not in aliases:
        raise InvalidParameter(f"unknown prediction type {value!r}; allowed: epsilon, v_prediction")
    return aliases[value]


def unet_predicts_v(unet) -> bool:
    """A1111's test for SD2 v-parameterization, on a diffusers UNet.

    At the last training timestep (t=999) the noisy latent is almost pure noise. Fed a constant 0.5
    latent and a constant 0.5 context, an epsilon UNet predicts noise close to its input, so the
    mean of (output - input) is near 0; a v UNet predicts v = alpha*eps - sigma*x0, and this mean
    comes out well below -1. The threshold -1 is A1111's.
    """
    import torch

    param = next(unet.parameters())
    channels = unet.config.in_channels
    context = unet.config.cross_attention_dim
    x = torch.full((1, channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    cond = torch.full((1, 2, context), 0.5, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
    return (out.float() - x.float()).mean().item() < -1.0


@dataclass
class SingleFileResult:
    pipe: Any
    family: str
    prediction_type: str | None  # None: SD2 without a marker; run unet_predicts_v on the final device
    config_dir: Path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"config folder lacks {path.parent.name}/{path.name}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON") from exc


def _first_shape(shapes: Mapping[str, tuple], pattern: str) -> tuple | None:
    regex = re.compile(pattern)
    for key in sorted(shapes):
        if regex.fullmatch(key):
            return tuple(shapes[key])
    return None


def _count_indices(shapes: Mapping[str, tuple], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {m.group(1) for k in shapes if (m := regex.match(k))}
    return len(found)


def check_architecture(shapes: Mapping[str, tuple], family: str, config_dir: Path, *, name: str) -> None:
    """Compare a few shapes of the checkpoint with the config folder; ModelLoadError on a mismatch.

    Checked: UNet base channels and context width, VAE base channels, each text encoder's width
    and depth. These differ between every real architecture, so a mismatch means the config
    folder is the wrong one (or the checkpoint is damaged)."""
    unet_cfg = _read_json(config_dir / "unet" / "config.json")
    vae_cfg = _read_json(config_dir / "vae" / "config.json")
    problems: list[str] = []

    def expect(what: str, found, wanted) -> None:
        if found is not None and found != wanted:
            problems.append(f"{what} {found}, expected {wanted}")

    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    expect("UNet base channels", conv_in[0] if conv_in else None, unet_cfg["block_out_channels"][0])
    to_k = _first_shape(shapes, re.escape(UNET_PREFIX) + r".*attn2\.to_k\.weight")
    expect("UNet context width", to_k[1] if to_k else None, unet_cfg["cross_attention_dim"])
    vae_in = shapes.get(VAE_PREFIX + "encoder.conv_in.weight")
    expect("VAE base channels", vae_in[0] if vae_in else None, vae_cfg["block_out_channels"][0])

    encoders: list[tuple[str, str, str]] = []  # (config subfolder, token-embedding key, layer regex)
    if family == "sd1":
        encoders.append(("text_encoder", SD1_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
                         re.escape(SD1_CLIP_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\."))
    elif family == "sd2":
        encoders.append(("text_encoder", SD2_OPENCLIP_PREFIX + "token_embedding.weight",
                         re.escape(SD2_OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\."))
    else:
        encoders.append(("text_encoder", SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
                         re.escape(SDXL_CLIP_PREFIX) + r"text_model\.encoder\.layers\.(\d+)\."))
        encoders.append(("text_encoder_2", SDXL_OPENCLIP_PREFIX + "token_embedding.weight",
                         re.escape(SDXL_OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\."))
    for sub, embed_key, layer_re in encoders:
        te_cfg = _read_json(config_dir / sub / "config.json")
        embed = shapes.get(embed_key)
        if embed is None:
            problems.append(f"no {sub} weights ({embed_key})")
            continue
        expect(f"{sub} width", embed[1], te_cfg["hidden_size"])
        layers = _count_indices(shapes, layer_re)
        wanted = te_cfg["num_hidden_layers"]
        # SD2 files keep OpenCLIP's last layer, which SD2 does not use (diffusers drops it).
        if not (layers == wanted or (family == "sd2" and layers == wanted + 1)):
            problems.append(f"{sub} depth {layers} layers, expected {wanted}")
    if problems:
        raise ModelLoadError(
            f"{name} does not match the {family} architecture in {config_dir}: {'; '.join(problems)}. "
            "A non-standard architecture needs a diffusers config folder describing it (config_dir)"
        )


def _tokenizer(config_dir: Path, subfolder: str, pad_token: str):
    from malerei.engine.clip_bpe import build_clip_tokenizer

    folder = config_dir / subfolder
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(config_dir), subfolder=subfolder, local_files_only=True)
    return build_clip_tokenizer(pad_token=pad_token)


def _scheduler(config_dir: Path, family: str, prediction_type: str | None, ztsnr: bool):
    import diffusers

    folder = config_dir if (config_dir / "scheduler" / "scheduler_config.json").is_file() else None
    if folder is None:
        folder = CONFIG_ROOT / ("sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family)
    config = _read_json(folder / "scheduler" / "scheduler_config.json")
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), None)
    if cls is None:
        raise ModelLoadError(f"{folder}: unknown scheduler class {config.get('_class_name')!r}")
    overrides: dict[str, Any] = {"prediction_type": prediction_type or "epsilon"}
    if ztsnr:
        overrides["rescale_betas_zero_snr"] = True
    return cls.from_config({**config, **overrides})


def _no_meta_weights(module, what: str, name: str) -> None:
    missing = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(
            f"{name}: the checkpoint lacks {len(missing)} {what} weights (e.g. {missing[0]}); "
            "the file is incomplete or of another architecture"
        )


def load_single_file(
    path: Path,
    *,
    allow_pickle: bool = False,
    torch_dtype=None,
    prediction_type: str | None = None,
    config_dir: Path | None = None,
) -> SingleFileResult:
    """Read an original-layout checkpoint and build the diffusers pipeline from it, on the CPU.

    See the module docstring for the family, config and prediction-type rules.
    """
    from malerei.engine.offline import enforce_offline

    enforce_offline()
    from malerei.engine.checkpoint_files import load_state_dict

    path = Path(path)
    prediction_type = check_prediction_type(prediction_type)
    state_dict = normalize_checkpoint(load_state_dict(path, allow_pickle=allow_pickle))
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    family = detect_family(shapes, name=path.name)

    prediction_type = prediction_type or sidecar_parameterization(path)
    if prediction_type is None and "v_pred" in state_dict:
        prediction_type = "v_prediction"
    if prediction_type is None and family != "sd2":
        prediction_type = "epsilon"
    ztsnr = "ztsnr" in state_dict

    if config_dir is None:
        config_dir = CONFIG_ROOT / ("sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family)
    config_dir = Path(config_dir)
    if not (config_dir / "model_index.json").is_file():
        raise ModelLoadError(
            f"config folder {config_dir} has no model_index.json (a diffusers config folder is needed)"
        )
    check_architecture(shapes, family, config_dir, name=path.name)
    index = _read_json(config_dir / "model_index.json")
    expected_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    if index.get("_class_name") != expected_class:
        raise ModelLoadError(
            f"config folder {config_dir} describes a {index.get('_class_name')}, but {path.name} is {family} "
            f"(needs {expected_class})"
        )

    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dtype = torch_dtype or torch.float32
    # Only ask diffusers to cast when needed: its cast warns even when there is nothing to do.
    needs_cast = any(v.dtype != dtype for v in state_dict.values() if v.is_floating_point())
    common = {"config": str(config_dir), "torch_dtype": dtype if needs_cast else None, "local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state_dict, subfolder="text_encoder", **common
        )
        text_encoder_2 = None
        if family == "sdxl":
            text_encoder_2 = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, state_dict, subfolder="text_encoder_2", **common
            )
    except ModelLoadError:
        raise
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path.name}: conversion to diffusers failed: {first[:300]}") from exc
    del state_dict

    parts = ((unet, "UNet"), (vae, "VAE"), (text_encoder, "text encoder"), (text_encoder_2, "second text encoder"))
    for module, what in parts:
        if module is not None:
            _no_meta_weights(module, what, path.name)

    pads = _PAD_TOKENS[family]
    tokenizer = _tokenizer(config_dir, "tokenizer", pads[0])
    scheduler = _scheduler(config_dir, family, prediction_type, ztsnr)
    if family == "sdxl":
        tokenizer_2 = _tokenizer(config_dir, "tokenizer_2", pads[1])
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
        encoders = ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2))
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        encoders = ((text_encoder, tokenizer),)
    for encoder, tok in encoders:
        if len(tok) > encoder.config.vocab_size:
            raise ModelLoadError(
                f"{path.name}: its text encoder knows {encoder.config.vocab_size} tokens but the tokenizer "
                f"has {len(tok)}; put a matching tokenizer/ in the config folder"
            )
    return SingleFileResult(pipe=pipe, family=family, prediction_type=prediction_type, config_dir=config_dir)
