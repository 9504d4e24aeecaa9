"""img2img, inpaint (4- and 9-channel UNets), outpaint and hires fix on the tiny SD fixtures."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from malerei.engine import images, img2img
from malerei.engine.errors import ImageError, InvalidParameter
from malerei.engine.pipeline import GenerationParams, decode
from malerei.engine.samplers import img2img_steps

torch.set_num_threads(1)

P = GenerationParams(prompt="a red circle", steps=4, seed=7, sampler="Euler", cfg_scale=5.0)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from malerei.engine.loading import load_model

    return load_model(tiny_sd1.folder, device="cpu")


@pytest.fixture(scope="module")
def inpainting_model(tiny_sd1, tmp_path_factory):
    """The tiny SD1 folder with a 9-channel inpainting UNet (latents, mask, masked-image latents)."""
    from diffusers import UNet2DConditionModel

    from malerei.engine.loading import load_model

    folder = tmp_path_factory.mktemp("inpainting") / "tiny-sd1-inpainting"
    shutil.copytree(tiny_sd1.folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(11)
    unet = UNet2DConditionModel(**{**config, "in_channels": 9})
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    return load_model(folder, device="cpu")


def picture(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (40, 90, 220))
    image.paste((220, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def square_mask(size=(64, 64), box=(24, 24, 44, 44)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def arr(image) -> np.ndarray:
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------------------------------------
# img2img


def test_strength_runs_the_last_part_of_the_schedule(sd1):
    for strength, steps in ((0.5, 10), (0.25, 8), (1.0, 4)):
        seen = []
        img2img.img2img(sd1, dataclasses.replace(P, steps=steps), picture(), strength=strength,
                        progress=lambda i, total, _x: seen.append(total))
        assert seen and seen[-1] == img2img_steps(steps, strength) == int(strength * steps) + (strength < 1)


def test_img2img_keeps_more_of_the_image_at_low_strength(sd1):
    source = picture()
    with torch.inference_mode():
        roundtrip = images.from_tensor(decode(sd1.pipe, img2img.encode_latents(sd1, images.to_tensor(source))))[0]
    low = img2img.img2img(sd1, P, source, strength=0.1)[0]
    high = img2img.img2img(sd1, P, source, strength=1.0)[0]
    assert np.abs(arr(low.image) - arr(roundtrip)).mean() < np.abs(arr(high.image) - arr(roundtrip)).mean()
    again = img2img.img2img(sd1, P, source, strength=0.1)[0]
    assert np.array_equal(arr(again.image), arr(low.image))  # seeded: reproducible
    assert "Denoising strength: 0.1" in low.infotext and "Seed: 7" in low.infotext
    assert low.recipe["kind"] == "img2img" and low.recipe["img2img"]["strength"] == 0.1


def test_img2img_size_and_resize_modes(sd1):
    wide = picture((96, 48))
    default = img2img.img2img(sd1, P, wide, strength=0.5)[0]
    assert default.image.size == (96, 48)  # the image's size when none is given
    for mode in images.RESIZE_MODES:
        out = img2img.img2img(sd1, dataclasses.replace(P, width=64, height=64), wide, strength=0.5, resize_mode=mode)
        assert out[0].image.size == (64, 64)
        assert ("Resize mode: " + mode.capitalize() in out[0].infotext) == (mode != "just resize")
    batch = img2img.img2img(sd1, dataclasses.replace(P, batch_size=2), wide, strength=0.5)
    assert [r.seed for r in batch] == [7, 8] and not np.array_equal(arr(batch[0].image), arr(batch[1].image))


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("nan"), "0.5"])
def test_strength_out_of_range(sd1, strength):
    with pytest.raises(InvalidParameter, match="denoising strength"):
        img2img.img2img(sd1, P, picture(), strength=strength)


def test_sd2_and_sdxl_img2img(tiny_sd2, tiny_sdxl):
    from malerei.engine.loading import load_model

    for fixture in (tiny_sd2, tiny_sdxl):
        model = load_model(fixture.folder, device="cpu")
        out = img2img.img2img(model, dataclasses.replace(P, steps=2), picture(), strength=0.6)
        assert out[0].image.size == (64, 64)


# ---------------------------------------------------------------------------------------------
# inpaint


@pytest.mark.parametrize("content", img2img.MASKED_CONTENT)
@pytest.mark.parametrize("only_masked", [False, True])
def test_inpaint_changes_only_the_blurred_mask(sd1, content, only_masked):
    source = picture((80, 64))
    mask = square_mask((80, 64), (30, 20, 50, 40))
    options = img2img.InpaintOptions(strength=1.0, mask_blur=3, masked_content=content, only_masked=only_masked,
                                      padding=8)
    [result] = img2img.inpaint(sd1, dataclasses.replace(P, width=64, height=64) if only_masked else P,
                               source, mask, options=options)
    blurred = np.asarray(images.blur_mask(mask, 3))
    diff = np.abs(arr(result.image) - arr(source)).max(axis=2)
    assert result.image.size == source.size
    assert diff[blurred == 0].max() == 0  # outside the blurred mask: exactly the original
    assert diff[np.asarray(mask) == 255].mean() > 10  # inside: repainted
    assert f"Masked content: {content}" in result.infotext and "Mask blur: 3" in result.infotext
    assert ("Inpaint area: Only masked" in result.infotext) == only_masked
    section = result.recipe["inpaint"]
    assert section["masked_content"] == content and (section["crop_region"] is not None) == only_masked


def test_masked_content_modes_differ(sd1):
    source, mask = picture(), square_mask()
    outs = {c: arr(img2img.inpaint(sd1, P, source, mask, options=img2img.InpaintOptions(
        strength=0.5, masked_content=c))[0].image) for c in img2img.MASKED_CONTENT}
    inside = np.asarray(mask) == 255
    values = [outs[c][inside] for c in img2img.MASKED_CONTENT]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not np.array_equal(values[i], values[j])


def test_mask_from_alpha_and_mask_errors(sd1):
    rgba = picture().convert("RGBA")
    rgba.paste((0, 0, 0, 0), (24, 24, 44, 44))
    [result] = img2img.inpaint(sd1, P, rgba, None, options=img2img.InpaintOptions(mask_blur=0, strength=1.0))
    diff = np.abs(arr(result.image) - arr(rgba.convert("RGB"))).max(axis=2)
    assert diff[:24].max() == 0 and diff[24:44, 24:44].mean() > 10
    with pytest.raises(ImageError, match="same size"):
        img2img.inpaint(sd1, P, picture(), square_mask((32, 32), (0, 0, 8, 8)))
    with pytest.raises(ImageError, match="all black"):
        img2img.inpaint(sd1, P, picture(), Image.new("L", (64, 64), 0))
    with pytest.raises(ImageError, match="no alpha"):
        img2img.inpaint(sd1, P, picture(), None)
    with pytest.raises(InvalidParameter, match="masked content"):
        img2img.inpaint(sd1, P, picture(), square_mask(), options=img2img.InpaintOptions(masked_content="noise"))
    with pytest.raises(InvalidParameter, match="mask blur"):
        img2img.inpaint(sd1, P, picture(), square_mask(), options=img2img.InpaintOptions(mask_blur=100))


def test_blend_puts_the_noised_init_back_outside_the_mask():
    from malerei.engine.samplers.hooks import NoiseLevel

    init, noise = torch.full((1, 4, 2, 2), 3.0), torch.ones(1, 4, 2, 2)
    keep = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    blend = img2img._blend_fn(init, keep, noise)
    x = torch.zeros(1, 4, 2, 2)
    mid = blend(x, 0, NoiseLevel(sigma=2.0, timestep=None, add_noise=lambda x0, e: x0 + 2.0 * e))
    assert torch.all(mid[..., 0, 0] == 5.0) and torch.all(mid[..., 1, :] == 0)
    end = blend(x, 1, NoiseLevel(sigma=0.0, timestep=None, add_noise=lambda x0, e: x0))
    assert torch.all(end[..., 0, 0] == 3.0)


def test_nine_channel_unet_gets_mask_and_masked_image_latents(inpainting_model):
    unet = inpainting_model.pipe.unet
    seen = []
    handle = unet.conv_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    try:
        assert img2img.unet_kind(inpainting_model) == "inpainting"
        source, mask = picture(), square_mask(box=(24, 24, 48, 48))
        [result] = img2img.inpaint(inpainting_model, P, source, mask,
                                   options=img2img.InpaintOptions(strength=1.0, mask_blur=0))
    finally:
        handle.remove()
    assert seen and all(x.shape[1] == 9 for x in seen)
    first = seen[0]
    assert first.shape[0] == 2  # CFG: one batched call, uncond and cond halves
    mask_channel = first[0, 4]
    expected = torch.zeros(8, 8)
    expected[3:6, 3:6] = 1  # 24..48 px -> latent cells 3..5
    assert torch.equal(mask_channel, expected) and torch.equal(first[0, 4:], first[1, 4:])
    with torch.inference_mode():
        masked_pixels = images.to_tensor(source) * (images.mask_to_tensor(mask) < 0.5)
        want = img2img.encode_latents(inpainting_model, masked_pixels)[0]
    assert torch.allclose(first[0, 5:], want, atol=1e-5)
    diff = np.abs(arr(result.image) - arr(source)).max(axis=2)
    assert diff[np.asarray(mask) == 0].max() == 0 and diff[24:48, 24:48].mean() > 10
    assert result.recipe["inpaint"]["unet"] == "inpainting"
    # img2img with an inpainting model: mask everything, masked image empty (A1111).
    out = img2img.img2img(inpainting_model, P, source, strength=0.5)
    assert out[0].image.size == (64, 64)


def test_inpainting_model_refuses_the_hires_fix(inpainting_model):
    with pytest.raises(InvalidParameter, match="inpainting model"):
        img2img.hires_fix(inpainting_model, P, img2img.HiresOptions(scale=1.5))


# ---------------------------------------------------------------------------------------------
# outpaint


def test_outpaint_grows_the_canvas_and_keeps_the_middle(sd1):
    source = picture((48, 40))
    [result] = img2img.outpaint(sd1, P, source, left=16, right=0, up=8, down=16,
                                options=img2img.InpaintOptions(strength=0.9, masked_content="fill", mask_blur=2))
    assert result.image.size == (64, 64)
    out = arr(result.image)
    # The old image sits at (16, 8); away from the new edges (overlap 2 + blur) it is untouched.
    assert np.array_equal(out[8 + 10:8 + 40 - 10, 16 + 10:16 + 48], arr(source)[10:30, 10:48])
    assert result.recipe["outpaint"]["extend"] == {"left": 16, "right": 0, "up": 8, "down": 16}
    with pytest.raises(InvalidParameter, match="at least one"):
        img2img.outpaint(sd1, P, source)
    with pytest.raises(InvalidParameter, match="out of range"):
        img2img.outpaint(sd1, P, source, left=-4)


# ---------------------------------------------------------------------------------------------
# hires fix


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Lanczos"])
def test_hires_fix(sd1, upscaler):
    seen = []
    [result] = img2img.hires_fix(sd1, P, img2img.HiresOptions(scale=1.5, upscaler=upscaler, strength=0.5, steps=4),
                                 progress=lambda i, total, _x: seen.append(total))
    assert result.image.size == (96, 96)
    assert seen[0] == 4 and seen[-1] == img2img_steps(4, 0.5)  # first pass, then the hires pass
    text = result.infotext
    assert "Size: 64x64" in text and "Hires upscale: 1.5" in text and f"Hires upscaler: {upscaler}" in text
    assert "Denoising strength: 0.5" in text and result.recipe["hires"]["size"] == [96, 96]


def test_hires_fix_with_an_upscaler_model(sd1, tmp_path):
    import image_nets

    from malerei.engine.upscale import load_upscaler

    path = image_nets.save(image_nets.compact_state(scale=2), tmp_path / "x2.safetensors")
    up = load_upscaler(path)
    [result] = img2img.hires_fix(sd1, P, img2img.HiresOptions(scale=2, upscaler="x2", strength=0.3), upscaler=up)
    assert result.image.size == (128, 128) and "Hires upscaler: x2" in result.infotext


@pytest.mark.parametrize("options, words", [
    (img2img.HiresOptions(scale=1.0), "hires scale"),
    (img2img.HiresOptions(scale=5), "hires scale"),
    (img2img.HiresOptions(strength=0), "denoising strength"),
    (img2img.HiresOptions(steps=0), "hires steps"),
    (img2img.HiresOptions(upscaler="4x-Unknown"), "not loaded"),
])
def test_hires_options_are_checked(sd1, options, words):
    with pytest.raises(InvalidParameter, match=words):
        img2img.hires_fix(sd1, P, options)


def test_generate_images_runs_the_hires_fix_when_asked(sd1):
    import argparse

    from malerei.commands import edit

    parser = argparse.ArgumentParser()
    edit.add_hires_options(parser)
    plain = edit.generate_images(sd1, P, parser.parse_args([]), preview_every=0)
    hires = edit.generate_images(sd1, P, parser.parse_args(["--hires-scale", "1.5", "--hires-steps", "2"]),
                                 preview_every=0)
    assert plain[0].image.size == (64, 64) and hires[0].image.size == (96, 96)
    assert "Hires upscale" not in plain[0].infotext and "Hires steps: 2" in hires[0].infotext
