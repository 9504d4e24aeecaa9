"""generate(): equal to the bare diffusers pipelines, batch/thread invariance, checks, metadata."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from malerei.engine import metadata
from malerei.engine.errors import Cancelled, InvalidParameter
from malerei.engine.loading import load_model
from malerei.engine.pipeline import GenerationParams, generate, preview_images, rescale_guidance

PROMPT = "a photo of a red circle on (blue:1.0) background"  # weight 1.0: plain text to diffusers
NEGATIVE = "green square"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, busy CPU they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: load_model(tiny.folder, device="cpu", dtype="fp32") for family, tiny in tiny_models.items()}


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def diffusers_reference(model, scheduler_cls, *, prompt, negative, seed, steps, cfg, size, **scheduler_options):
    """The stock diffusers pipeline on the same components, with the documented scheduler swap."""
    pipe_cls = type(model.pipe)
    pipe = pipe_cls(**model.pipe.components)
    pipe.scheduler = scheduler_cls.from_config(model.pipe.scheduler.config, **scheduler_options)
    pipe.set_progress_bar_config(disable=True)
    # An empty negative prompt is None to diffusers: SDXL then zeroes it, as A1111 does.
    out = pipe(prompt.replace("(blue:1.0)", "blue"), negative_prompt=negative or None,
               generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
               guidance_scale=cfg, height=size, width=size, output_type="np").images
    return (out[0] * 255).round().astype(np.int16)


CASES = [
    # family, A1111 sampler, schedule type, diffusers scheduler class, its options
    ("sd1", "Euler", "Automatic", "EulerDiscreteScheduler", {}),
    ("sd1", "DPM++ 2M", "Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("sd1", "Euler a", "Automatic", "EulerAncestralDiscreteScheduler", {}),
    ("sd2", "DDIM", "Automatic", "DDIMScheduler", {}),
    ("sd2", "Euler", "Automatic", "EulerDiscreteScheduler", {}),
    ("sdxl", "Euler", "Automatic", "EulerDiscreteScheduler", {}),
    ("sdxl", "DPM++ 2M", "Automatic", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("family,sampler,schedule,scheduler_cls,options", CASES)
def test_equals_bare_diffusers_pipeline(models, family, sampler, schedule, scheduler_cls, options):
    import diffusers

    model = models[family]
    negative = "" if sampler == "DPM++ 2M" and family == "sdxl" else NEGATIVE  # SDXL's zeroed empty negative too
    expected = diffusers_reference(model, getattr(diffusers, scheduler_cls), prompt=PROMPT, negative=negative,
                                   seed=1234, steps=5, cfg=6.5, size=64, **options)
    [result] = generate(model, GenerationParams(prompt=PROMPT, negative_prompt=negative, sampler=sampler,
                                                scheduler=schedule, steps=5, cfg_scale=6.5, seed=1234,
                                                width=64, height=64))
    got = pixels(result)
    assert got.shape == expected.shape == (64, 64, 3)
    assert np.abs(got - expected).max() <= 1, f"{family} {sampler}: differs from diffusers"
    assert result.seed == 1234


def test_guidance_rescale_equals_diffusers(models):
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    a, b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    torch.testing.assert_close(rescale_guidance(a[None], b[None], 0.7), rescale_noise_cfg(a[None], b[None], 0.7))

    model = models["sd2"]
    pipe = type(model.pipe)(**model.pipe.components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(3),
                    num_inference_steps=4, guidance_scale=7.0, guidance_rescale=0.7, height=64, width=64,
                    output_type="np").images[0]
    [result] = generate(model, GenerationParams(prompt="a red circle", negative_prompt=NEGATIVE, sampler="Euler",
                                                steps=4, cfg_scale=7.0, seed=3, width=64, height=64,
                                                guidance_rescale=0.7))
    assert np.abs(pixels(result) - (expected * 255).round()).max() <= 1
    assert metadata.parse_infotext(result.infotext)["Guidance rescale"] == "0.7"


def test_batch_equals_each_seed_alone(models):
    model = models["sd1"]
    params = dict(prompt="a cat", negative_prompt=NEGATIVE, sampler="Euler a", steps=4, cfg_scale=5.0)
    batch = generate(model, GenerationParams(**params, seed=100, batch_size=3))
    assert [r.seed for r in batch] == [100, 101, 102]
    for i, r in enumerate(batch):
        [alone] = generate(model, GenerationParams(**params, seed=100 + i))
        assert np.abs(pixels(r) - pixels(alone)).max() <= 1
        assert r.recipe["params"]["seed"] == 100 + i and r.recipe["batch"] == {
            "seed": 100, "subseed": None, "size": 3, "index": i}
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 10  # different seeds, different images


def test_parallel_threads_equal_sequential(models):
    model = models["sd1"]
    jobs = [GenerationParams(prompt="a red circle", sampler="Euler a", steps=4, seed=7),
            GenerationParams(prompt="a blue square", sampler="DPM++ 2M", steps=4, seed=8, batch_size=2)]
    sequential = [generate(model, p) for p in jobs]
    parallel: list = [None, None]
    errors: list = []

    def run(i):
        try:
            parallel[i] = generate(model, jobs[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seq, par in zip(sequential, parallel, strict=True):
        assert len(seq) == len(par)
        for a, b in zip(seq, par, strict=True):
            assert np.array_equal(pixels(a), pixels(b))


def test_no_network_during_load_and_generate(tiny_sd1, no_network):
    model = load_model(tiny_sd1.folder, device="cpu")
    [result] = generate(model, GenerationParams(prompt="a dog", steps=2, seed=1))
    assert result.image.size == (64, 64)
    assert no_network == []


def test_cfg_pair_is_one_batched_unet_call(models):
    model = models["sd1"]
    calls: list[int] = []
    handle = model.pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]),
                                                   with_kwargs=True)
    try:
        generate(model, GenerationParams(prompt="a cat", sampler="Euler", steps=3, cfg_scale=7, batch_size=2, seed=1))
        assert calls == [4, 4, 4]  # [uncond x2; cond x2] in one call per step
        calls.clear()
        generate(model, GenerationParams(prompt="a cat", sampler="Euler", steps=3, cfg_scale=1, batch_size=2, seed=1))
        assert calls == [2, 2, 2]  # cfg 1: the uncond half is skipped
    finally:
        handle.remove()


def test_model_defaults_random_seed_and_metadata(models):
    model = models["sd1"]  # its malerei.json: Euler, 4 steps, cfg 5
    [result] = generate(model, GenerationParams(prompt="a red circle", negative_prompt="blue"))
    assert 0 <= result.seed < 2**32
    fields = metadata.parse_infotext(result.infotext)
    assert fields["Prompt"] == "a red circle" and fields["Negative prompt"] == "blue"
    assert fields["Steps"] == "4" and fields["Sampler"] == "Euler" and fields["CFG scale"] == "5"
    assert fields["Seed"] == str(result.seed) and (fields["Size-1"], fields["Size-2"]) == ("64", "64")
    assert fields["Model hash"] == model.short_hash and fields["Model"] == model.name
    recipe = result.recipe
    assert recipe["params"]["seed"] == result.seed and recipe["params"]["steps"] == 4
    assert recipe["model"]["file_hashes"] == model.file_hashes and recipe["dtype"] == "float32"
    assert {"torch", "diffusers", "transformers", "malerei"} <= set(recipe["versions"])
    # The recorded seed makes the same image again.
    [again] = generate(model, GenerationParams(prompt="a red circle", negative_prompt="blue", seed=result.seed))
    assert np.array_equal(pixels(again), pixels(result))


def test_variation_seed(models):
    model = models["sd1"]
    base = dict(prompt="a cat", steps=3, seed=5)
    [plain] = generate(model, GenerationParams(**base))
    [zero] = generate(model, GenerationParams(**base, subseed=9, subseed_strength=0.0))
    [varied] = generate(model, GenerationParams(**base, subseed=9, subseed_strength=0.4))
    [full] = generate(model, GenerationParams(**base, subseed=9, subseed_strength=1.0))
    assert np.array_equal(pixels(plain), pixels(zero))
    assert not np.array_equal(pixels(plain), pixels(varied))
    fields = metadata.parse_infotext(varied.infotext)
    assert fields["Variation seed"] == "9" and fields["Variation seed strength"] == "0.4"
    assert "Variation seed" not in metadata.parse_infotext(zero.infotext)
    # Strength 1 is the variation seed's own noise (up to float rounding of the slerp).
    [other] = generate(model, GenerationParams(prompt="a cat", steps=3, seed=9))
    assert np.abs(pixels(full) - pixels(other)).max() <= 1


def test_progress_previews_and_cancel(models):
    model = models["sd1"]
    seen = []
    generate(model, GenerationParams(prompt="a cat", sampler="Euler", steps=4, seed=1, batch_size=2),
             progress=lambda step, total, latents: seen.append((step, total, latents)), preview_every=2)
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [lat is None for _, _, lat in seen] == [True, False, True, False]
    previews = preview_images(model.pipe, seen[-1][2])
    assert len(previews) == 2 and previews[0].size == (8, 8) and previews[0].mode == "RGB"

    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        generate(model, GenerationParams(prompt="a cat", steps=10, seed=1), cancel=cancel)
    assert len(calls) == 3  # stopped before the third model call, not at the end


class _LinearVAE(torch.nn.Module):
    """A VAE whose latent pixel is a fixed linear function of its 8x8 block's mean colour."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=0.5, block_out_channels=(1, 1, 1, 1), shift_factor=None,
                                      latents_mean=None, latents_std=None)
        self.mix = torch.nn.Parameter(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0],
                                                    [0.2, 0.2, 0.2]]))
        self.bias = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.0, 0.3]))

    def encode(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        mean = torch.einsum("lc,bchw->blhw", self.mix, pooled) + self.bias.view(1, -1, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))

    def decode(self, latents, return_dict=False):
        colour = torch.einsum("cl,blhw->bchw", torch.linalg.pinv(self.mix), latents - self.bias.view(1, -1, 1, 1))
        return (torch.nn.functional.interpolate(colour, scale_factor=8),)


def test_preview_map_recovers_a_linear_latent_space():
    pipe = SimpleNamespace(vae=_LinearVAE())
    colours = torch.tensor([[0.6, -0.2, -0.5], [-0.9, 0.4, 0.1]]).view(2, 3, 1, 1).expand(2, 3, 16, 24)
    latents = pipe.vae.encode(colours).latent_dist.mean * pipe.vae.config.scaling_factor
    previews = preview_images(pipe, latents)
    assert [p.size for p in previews] == [(3, 2), (3, 2)]
    for preview, colour in zip(previews, colours[:, :, 0, 0], strict=True):
        expected = ((colour / 2 + 0.5) * 255).numpy()
        assert np.abs(np.asarray(preview, dtype=np.float32) - expected).max() <= 1


@pytest.mark.parametrize("bad,words", [
    (dict(width=60), "multiple of 8"),
    (dict(height=8), "out of range"),
    (dict(width=8192), "out of range"),
    (dict(steps=0), "steps"),
    (dict(steps=151), "steps"),
    (dict(cfg_scale=31.0), "cfg scale"),
    (dict(cfg_scale=-1.0), "cfg scale"),
    (dict(cfg_scale=float("nan")), "cfg scale"),
    (dict(batch_size=0), "batch size"),
    (dict(batch_size=65), "batch size"),
    (dict(sampler="Nope"), "unknown sampler"),
    (dict(scheduler="Nope"), "unknown schedule type"),
    (dict(sampler="Euler a", scheduler="Karras"), "not available"),
    (dict(subseed_strength=1.5), "variation strength"),
    (dict(seed=2**64), "seed"),
    (dict(clip_skip=0), "clip skip"),
])
def test_bad_parameters_are_refused(models, bad, words):
    with pytest.raises(InvalidParameter, match=words):
        generate(models["sd1"], GenerationParams(prompt="a cat", **bad))


def test_lora_tag_applies_for_the_job_only(tiny_models_dir):
    model = load_model("tiny-sd1", models_dir=tiny_models_dir, device="cpu")
    params = dict(negative_prompt=NEGATIVE, sampler="Euler", steps=3, seed=4)
    [before] = generate(model, GenerationParams(prompt="a red circle", **params), models_dir=tiny_models_dir)
    [with_lora] = generate(model, GenerationParams(prompt="a red circle <lora:tiny-kohya:1.0>", **params),
                           models_dir=tiny_models_dir)
    [after] = generate(model, GenerationParams(prompt="a red circle", **params), models_dir=tiny_models_dir)
    assert np.abs(pixels(with_lora) - pixels(before)).max() > 2
    assert np.array_equal(pixels(before), pixels(after))
    fields = metadata.parse_infotext(with_lora.infotext)
    assert fields["Prompt"] == "a red circle <lora:tiny-kohya:1.0>"
    assert "tiny-kohya" in fields["Lora hashes"]
    assert with_lora.recipe["loras"][0]["name"] == "tiny-kohya"


def test_run_job_img2img_and_blend_hooks(models):
    """The extension points a later img2img/inpainting job uses: init latents + strength, and a
    blend hook that can pin latents to the init image (here: everywhere)."""
    from PIL import Image

    from malerei.engine.pipeline import decode, encode_latents, pil_to_tensor, resolve_params, run_job, to_pil

    model = models["sd1"]
    card = Image.new("RGB", (64, 64), (200, 40, 40))
    card.paste((30, 60, 220), (0, 32, 64, 64))
    with torch.inference_mode():
        init = encode_latents(model.pipe, pil_to_tensor([card], width=64, height=64))
        reconstructed = np.asarray(to_pil(decode(model.pipe, init))[0], dtype=np.int16)
    job = resolve_params(model, GenerationParams(prompt="a cat", sampler="Euler", steps=6, seed=3, batch_size=2))

    # A UNet that predicts zero noise leaves Euler's latents where they start: txt2img stays at
    # the initial noise, img2img at the init latents plus the (small, at low strength) start
    # noise. Compared in latent space (the random tiny VAE's decoder amplifies any difference).
    finals = {}

    def keep(name):
        return lambda step, total, latents: finals.__setitem__(name, latents.clone())

    handle = model.pipe.unet.register_forward_hook(lambda module, args, out: (torch.zeros_like(out[0]),))
    try:
        run_job(model, job, progress=keep("txt2img"))
        [light, _] = run_job(model, job, init_latents=init, strength=0.05, kind="img2img", progress=keep("img2img"))
    finally:
        handle.remove()
    assert light.recipe["kind"] == "img2img"
    assert (finals["img2img"] - init).abs().mean() < 0.1 * init.abs().mean() + 0.05
    assert (finals["txt2img"] - init).abs().mean() > 1.0

    levels = []

    def pin(x, i, level):
        levels.append(i)
        return level.noised(init.expand_as(x), torch.zeros_like(x))

    [pinned, _] = run_job(model, job, init_latents=init, strength=1.0, blend=pin)
    assert levels == list(range(6))
    assert np.abs(pixels(pinned) - reconstructed).max() <= 1
    with pytest.raises(InvalidParameter, match="do not fit"):
        run_job(model, job, init_latents=init[:, :, :4])
