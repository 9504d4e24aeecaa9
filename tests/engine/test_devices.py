"""Device and dtype choice (cuda incl. ROCm, mps, cpu) and diffusers' memory switches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from malerei.engine import devices
from malerei.engine.devices import MemoryOptions, apply_memory_options, pick_device, pick_dtype
from malerei.engine.errors import InvalidParameter


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda torch: False)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda torch: True)
    assert pick_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # also what ROCm builds report
    assert pick_device(None) == torch.device("cuda")


def test_named_devices(monkeypatch, no_gpu):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    with pytest.raises(InvalidParameter, match="not available"):
        pick_device("cuda")
    with pytest.raises(InvalidParameter, match="not available"):
        pick_device("mps")
    with pytest.raises(InvalidParameter, match="allowed: auto, cuda, cuda:<index>, mps, cpu"):
        pick_device("tpu")
    with pytest.raises(InvalidParameter, match="allowed"):
        pick_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidParameter, match="cuda:0 .. cuda:1"):
        pick_device("cuda:2")


def test_gpu_backend_reports_rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert devices.gpu_backend() == "rocm"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", None, raising=False)
    assert devices.gpu_backend() == "none"


def test_dtypes():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert pick_dtype(None, cpu) == torch.float32
    assert pick_dtype(None, cuda) == torch.float16
    assert pick_dtype("auto", mps) == torch.float16
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert pick_dtype("fp32", cuda) == torch.float32
    assert pick_dtype("float16", cuda) == torch.float16
    with pytest.raises(InvalidParameter, match="not supported on cpu"):
        pick_dtype("fp16", cpu)
    with pytest.raises(InvalidParameter, match="allowed: auto, fp32, fp16, bf16"):
        pick_dtype("int8", cuda)


def test_memory_switches(tiny_sd1, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    from malerei.engine.loading import load_model

    pipe = load_model(tiny_sd1.folder, models_dir=tmp_path).pipe
    apply_memory_options(pipe, attention_slicing=True, vae_tiling=True, vae_slicing=True)
    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    apply_memory_options(pipe)  # all off again: SDPA, no tiling
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    with pytest.raises(InvalidParameter, match="needs a GPU"):
        apply_memory_options(pipe, cpu_offload="model", device=torch.device("cpu"))
    with pytest.raises(InvalidParameter, match="allowed: none, model, sequential"):
        apply_memory_options(pipe, cpu_offload="some")
    with pytest.raises(InvalidParameter, match="allowed: none, model, sequential"):
        MemoryOptions(cpu_offload="disk")


def test_cpu_offload_calls_diffusers(monkeypatch, tiny_sd1, tmp_path):
    from malerei.engine.loading import load_model

    pipe = load_model(tiny_sd1.folder, models_dir=tmp_path).pipe
    calls = []
    monkeypatch.setattr(pipe, "enable_model_cpu_offload", lambda device: calls.append(("model", device)))
    monkeypatch.setattr(pipe, "enable_sequential_cpu_offload", lambda device: calls.append(("sequential", device)))
    gpu = torch.device("cuda")
    apply_memory_options(pipe, cpu_offload="model", device=gpu)
    apply_memory_options(pipe, cpu_offload="sequential", device=gpu)
    assert calls == [("model", gpu), ("sequential", gpu)]


def test_no_torch_import_or_probing_at_import_time():
    code = (
        "import sys; import malerei.engine.devices, malerei.engine.model_dir, malerei.engine.loading, "
        "malerei.engine.lora, malerei.engine.embeddings, malerei.engine.single_file; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
