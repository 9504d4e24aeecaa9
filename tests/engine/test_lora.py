"""LoRA (kohya and diffusers/peft layouts) on the tiny SD1 model: a weight changes the outputs,
weight 0 and removal give back the original outputs bit for bit; bad files fail clearly."""

from __future__ import annotations

import pytest
import torch

from malerei.engine.errors import InvalidParameter, ModelLoadError, ModelNotFound, PickleRefused
from malerei.engine.loading import load_model
from malerei.engine.lora import apply_loras, lora_applied, lora_layout, remove_loras

LAYOUTS = ("kohya", "diffusers")


@pytest.fixture(scope="module")
def model(tiny_models_dir):
    return load_model("tiny-sd1", models_dir=tiny_models_dir)


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet output, text-encoder output) for fixed inputs."""
    pipe = model.pipe
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        unet_out = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    return unet_out, context


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_changes_output_and_is_removed_exactly(layout, model, tiny_lora_files):
    base_unet, base_text = outputs(model)
    with lora_applied(model, [(tiny_lora_files[layout], 1.0)]) as names:
        assert len(names) == 1
        unet_out, text_out = outputs(model)
    assert (unet_out - base_unet).abs().max() > 1e-3
    assert (text_out - base_text).abs().max() > 1e-3
    after_unet, after_text = outputs(model)
    assert torch.equal(after_unet, base_unet) and torch.equal(after_text, base_text)
    assert not any(type(m).__module__.startswith("peft") for m in model.pipe.unet.modules())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_weight_zero_is_the_original(layout, model, tiny_lora_files):
    base_unet, base_text = outputs(model)
    with lora_applied(model, [(tiny_lora_files[layout], 0.0)]):
        unet_out, text_out = outputs(model)
    assert torch.equal(unet_out, base_unet) and torch.equal(text_out, base_text)


def test_lora_delta_is_weight_times_alpha_over_rank(model, tiny_lora_files):
    """On a targeted layer the change is exactly weight * alpha/rank * up @ down @ x (kohya's rule)."""
    from safetensors.torch import load_file

    lora = load_file(str(tiny_lora_files["kohya"]))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up, alpha = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], lora[f"{name}.alpha"]
    layer = lambda: model.pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")  # noqa: E731
    x = torch.randn(3, down.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = layer()(x)
        for weight in (0.5, 1.0, -0.8):
            with lora_applied(model, [(tiny_lora_files["kohya"], weight)]):
                delta = layer()(x) - base
            expected = weight * (alpha / down.shape[0]) * (x @ down.T @ up.T)
            assert torch.allclose(delta, expected, atol=1e-5), weight


def test_two_loras_and_names_from_models_dir(model, tiny_models_dir):
    base_unet, _ = outputs(model)
    with lora_applied(model, [("tiny-kohya", 0.7), ("tiny-peft", 0.3)]) as names:
        assert len(set(names)) == 2
        both, _ = outputs(model)
        assert set(model.pipe.get_active_adapters()) == set(names)
    with lora_applied(model, [("tiny-kohya", 0.7)]):
        one, _ = outputs(model)
    assert not torch.equal(both, one) and not torch.equal(both, base_unet)
    assert torch.equal(outputs(model)[0], base_unet)


def test_lora_holds_the_model_lock(model, tiny_lora_files):
    import threading

    seen = []
    with lora_applied(model, [(tiny_lora_files["kohya"], 1.0)]):
        worker = threading.Thread(target=lambda: seen.append(model.lock.acquire(timeout=0.05)))
        worker.start()
        worker.join()
    assert seen == [False]  # another thread could not take the lock while the LoRA was active


def test_bad_loras(model, tiny_lora_files, tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    base_unet, _ = outputs(model)
    with pytest.raises(ModelNotFound, match="available: tiny-kohya, tiny-peft"):
        with lora_applied(model, [("nope", 1.0)]):
            pass
    with pytest.raises(InvalidParameter, match="finite"):
        with lora_applied(model, [("tiny-kohya", float("nan"))]):
            pass
    wrong = tmp_path / "wrong-shape.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 99),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(8, 2)},
              str(wrong))
    with pytest.raises(ModelLoadError, match="wrong-shape.safetensors: LoRA does not fit"):
        apply_loras(model.pipe, [(wrong, 1.0), ])
    with pytest.raises(ModelLoadError, match="full checkpoint, not a LoRA"):
        apply_loras(model.pipe, [(tiny_sd1.file, 1.0)])
    # a good LoRA before a bad one is rolled back too
    with pytest.raises(ModelLoadError):
        apply_loras(model.pipe, [(tiny_lora_files["kohya"], 1.0), (wrong, 1.0)])
    assert torch.equal(outputs(model)[0], base_unet)
    pickled = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1)}, pickled)
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        apply_loras(model.pipe, [(pickled, 1.0)])
    remove_loras(model.pipe)
    assert torch.equal(outputs(model)[0], base_unet)


def test_lora_layout_detection():
    assert lora_layout(["lora_unet_a.lora_down.weight"]) == "kohya"
    assert lora_layout(["lora_te1_a.alpha"]) == "kohya"
    assert lora_layout(["unet.a.lora_A.weight"]) == "diffusers"
    assert lora_layout(["text_encoder.a.lora.down.weight"]) == "diffusers"
    with pytest.raises(ModelLoadError, match="supported: kohya"):
        lora_layout(["something.weight"])
