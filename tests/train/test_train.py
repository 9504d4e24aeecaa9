"""Training loops: resumable to the same weights, and the recipe's pieces fit together end to end."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from malerei.train.common import batch_indices, learning_rate, load_checkpoint
from malerei.train.diffusion import DiffusionConfig, prepare_latents, train_diffusion
from malerei.train.vae import VAEConfig, train_vae
from malerei.world.shards import read_shards, write_shards

TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, mid_block_attention=False, batch_size=4,
                     steps=4, warmup=2, checkpoint_every=2, log_every=1)
TINY_UNET = DiffusionConfig(block_out_channels=(32, 32), attention_levels=(False, True), attention_heads=2,
                            text_hidden=32, text_layers=1, text_heads=2, text_ff=64, batch_size=4, steps=4,
                            warmup=2, checkpoint_every=2, log_every=1, ema_decay=0.9)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Intra-op threads are much slower than one on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_shards(out, n=24, seed=3, shard_size=12)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_and_batches_are_pure_functions_of_step():
    assert learning_rate(0, peak=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert learning_rate(100, peak=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert learning_rate(10, peak=1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert torch.equal(batch_indices(50, 8, 1, 7), batch_indices(50, 8, 1, 7))
    epoch = torch.cat([batch_indices(48, 8, 1, s) for s in range(6)])
    assert sorted(epoch.tolist()) == list(range(48)), "an epoch sees every sample once"


def test_vae_resume_gives_the_same_weights(shards, tmp_path):
    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "straight")
    train_vae(replace(TINY_VAE, steps=2), images, tmp_path / "pieces")
    train_vae(TINY_VAE, images, tmp_path / "pieces")  # resumes at step 2
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert _same(a["model"], b["model"])
    assert (tmp_path / "straight" / "loss.csv").read_text().count("\n") == 5  # header + 4 steps


def test_unet_resume_gives_the_same_weights_and_exports_a_stock_pipeline(shards, tmp_path):
    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    prepare_latents(shards, tmp_path / "vae", tmp_path / "latents")
    train_diffusion(TINY_UNET, tmp_path / "latents", tmp_path / "straight")
    train_diffusion(replace(TINY_UNET, steps=2), tmp_path / "latents", tmp_path / "pieces")
    train_diffusion(TINY_UNET, tmp_path / "latents", tmp_path / "pieces")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")
    for key in ("unet", "text_encoder", "ema_unet", "ema_text"):
        assert _same(a[key], b[key]), key

    from diffusers import StableDiffusionPipeline

    from malerei.train.export import build_pipeline, export_pipeline

    pipe, info = build_pipeline(tmp_path / "vae", tmp_path / "latents", tmp_path / "straight")
    out = export_pipeline(pipe, tmp_path / "model", training={"unet_steps": info["steps"]})
    stock = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    image = stock("a small red circle in the center on a blue background", num_inference_steps=2,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_periodic_evaluation_writes_adherence_against_training_time(shards, tmp_path):
    from malerei.train.diffusion import periodic_evaluator
    from malerei.world.eval_set import eval_cases

    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    prepare_latents(shards, tmp_path / "vae", tmp_path / "latents")
    config = replace(TINY_UNET, eval_every=2)
    cases = eval_cases(seen=2, heldout=1, two=1)
    evaluate = periodic_evaluator(config, tmp_path / "vae", tmp_path / "latents", tmp_path / "unet", cases=cases)
    train_diffusion(config, tmp_path / "latents", tmp_path / "unet", evaluate=evaluate)
    import csv

    rows = list(csv.DictReader((tmp_path / "unet" / "eval.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert float(rows[0]["minutes"]) <= float(rows[1]["minutes"])
    for name in ("seen_adherence", "heldout_position", "two_adherence", "two_objects"):
        assert 0.0 <= float(rows[-1][name]) <= 1.0
    # The minutes are training time: the evaluation's own time is not counted.
    assert load_checkpoint(tmp_path / "unet" / "checkpoint.pt")["seconds"] / 60 >= float(rows[-1]["minutes"]) - 0.006  # rounded to 2 places
    from malerei.train.export import MODEL_DEFAULTS

    assert {float(r["cfg"]) for r in rows} == {MODEL_DEFAULTS["cfg_scale"]}  # evaluated as it ships
    # a file written before the cfg column keeps its columns when the run goes on
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval.csv").write_text("step,minutes,seen_adherence\n2,0.1,0.5\n")
    again = periodic_evaluator(config, tmp_path / "vae", tmp_path / "latents", old, cases=cases)
    train_diffusion(replace(config, steps=2), tmp_path / "latents", old, evaluate=again)
    assert (old / "eval.csv").read_text().splitlines()[0] == "step,minutes,seen_adherence"
    assert len(list(csv.DictReader((old / "eval.csv").open()))) == 2


def test_norms_keep_flat_colour():
    """GroupNorm with one channel a group would remove a flat background's colour before the output
    conv; the shipped configs keep several channels a group."""
    from malerei.train.diffusion import build_unet
    from malerei.train.vae import build_vae

    vae, unet = build_vae(VAEConfig()), build_unet(DiffusionConfig(), 8, 16)
    for model in (vae, unet):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_channels // m.num_groups >= 4 for m in norms)


def test_decoder_fine_tuning_keeps_the_latent_space(shards, tmp_path):
    from malerei.train.vae import to_model_space

    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    tuned = replace(TINY_VAE, decoder_from=str(tmp_path / "vae"), seed=1)
    train_vae(tuned, images, tmp_path / "decoder")
    base = load_checkpoint(tmp_path / "vae" / "checkpoint.pt")["model"]
    new = load_checkpoint(tmp_path / "decoder" / "checkpoint.pt")["model"]
    frozen = [k for k in base if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(base[k], new[k]) for k in frozen), "the encoder (the UNet's latent space) moved"
    assert any(not torch.equal(base[k], new[k]) for k in base if k.startswith("decoder.")), "the decoder did not train"
    from malerei.train.vae import load_trained_vae

    x = to_model_space(torch.from_numpy(images[:2]))
    with torch.no_grad():
        za = load_trained_vae(tmp_path / "vae").encode(x).latent_dist.mean
        zb = load_trained_vae(tmp_path / "decoder").encode(x).latent_dist.mean
    assert torch.equal(za, zb)


def test_recipe_runs_from_nothing_to_a_stock_pipeline_folder(tmp_path):
    """`malerei train all` end to end at toy size: render, VAE, latents, UNet (evaluated), decoder, export."""
    from diffusers import StableDiffusionPipeline

    from malerei.train.recipe import RecipeConfig, run_recipe

    config = RecipeConfig(runs=tmp_path / "runs", out=tmp_path / "model", n_images=24, vae_minutes=0.01,
                          unet_minutes=0.01, decoder_minutes=0.01, device="cpu", eval_set=(2, 1, 1),
                          vae=replace(TINY_VAE, steps=10**6),
                          unet=replace(TINY_UNET, steps=10**6, object_weight=2.0, edit_fraction=0.5))
    lines = []
    run_recipe(config, log=lines.append)
    runs = tmp_path / "runs"
    edits = torch.load(runs / "latents" / "edits.pt", weights_only=True)  # the edit pairs, all 24 scenes
    assert len(edits["named"]) == 24 and (runs / "latents" / "objects.pt").exists()
    for run in ("vae", "unet", "decoder"):
        assert (runs / run / "checkpoint.pt").exists() and (runs / run / "config.json").exists(), run
    assert json.loads((runs / "decoder" / "config.json").read_text())["decoder_from"] == str(runs / "vae")
    assert (runs / "unet" / "eval.csv").read_text().count("\n") == 2  # header + the final evaluation
    assert any(line.startswith("exported") for line in lines)
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert stock.vae.config.latent_channels == TINY_VAE.latent_channels


def test_model_card_floors_and_growth_table(tmp_path):
    from malerei.train.model_card import floors_from, growth_cfg, growth_table

    report = {"summary": {"seen": {"adherence": 0.92, "colour": 0.05, "n": 24}, "two": {"objects": 0.5, "n": 16}}}
    assert floors_from(report) == {"seen": {"adherence": 0.82, "colour": 0.0}, "two": {"objects": 0.4}}
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("step,minutes,seen_adherence,heldout_adherence,two_adherence,seen_colour,seen_shape,seen_size,seen_position\n"
                        "1000,14.02,0.5,0.25,0.1,0.9,0.6,0.8,0.7\n")
    table = growth_table(csv_path)
    assert table.splitlines()[2] == "| 1000 | 14 | 50% | 25% | 10% | 90% | 60% | 80% | 70% |"
    assert growth_table(tmp_path / "missing.csv").startswith("(no periodic")
    assert growth_cfg(csv_path) == "CFG 5"  # runs before the cfg column evaluated at 5
    (tmp_path / "new.csv").write_text("step,minutes,cfg,seen_adherence\n1000,14.0,2.5,0.5\n2000,28.0,2.5,0.6\n")
    assert growth_cfg(tmp_path / "new.csv") == "CFG 2.5"


def test_timesteps_favour_the_layout_range_when_asked():
    from malerei.train.common import step_generator
    from malerei.train.diffusion import sample_timesteps

    uniform = replace(TINY_UNET, high_noise_fraction=0.0)
    mixed = replace(TINY_UNET, high_noise_fraction=0.5, high_noise_min_t=850, high_noise_from_step=10)
    u = sample_timesteps(uniform, 20, 4000, step_generator(0, 20))
    m = sample_timesteps(mixed, 20, 4000, step_generator(0, 20))
    before = sample_timesteps(mixed, 5, 4000, step_generator(0, 5))
    assert 0.12 < (u >= 850).float().mean() < 0.18  # uniform: 15 %
    assert 0.50 < (m >= 850).float().mean() < 0.65  # half redrawn from [850, 1000): 57.5 %
    assert 0.12 < (before >= 850).float().mean() < 0.18  # the curriculum starts at its step
    assert m.min() >= 0 and m.max() <= 999
    assert torch.equal(m, sample_timesteps(mixed, 20, 4000, step_generator(0, 20))), "a pure function of (seed, step)"
    # the low-noise end: 40 % of the samples not redrawn for layout come from [0, 300)
    both = replace(mixed, detail_fraction=0.4, detail_max_t=300)
    b = sample_timesteps(both, 20, 4000, step_generator(0, 20))
    assert 0.50 < (b >= 850).float().mean() < 0.65  # the layout share is untouched
    assert 0.22 < (b < 300).float().mean() < 0.32  # 0.5 * (0.4 + 0.6 * 0.3) = 29 %, against 15 % in m
    assert 0.12 < (m < 300).float().mean() < 0.18


def test_reader_mask_loss_sees_what_the_reader_sees():
    """Zero for a perfect reconstruction; a triangle whose apex is drawn soft (a near-invisible change
    in MSE) costs far more than the same MSE spread as faint noise; and gradients reach the pixels."""
    from malerei.train.vae import reader_mask_loss, to_model_space
    from malerei.world.render import render
    from malerei.world.scene import Scene, WorldObject

    tri = WorldObject(shape="triangle", colour="red", size="small", cell=(1, 1), cx=32, cy=32, extent=10)
    original = to_model_space(torch.from_numpy(render(Scene(background="blue", objects=(tri,)), 64)[None]))
    assert reader_mask_loss(original, original).item() < 1e-6
    blurred = original.clone()
    box = original[..., 24:42, 24:42]
    blurred[..., 24:42, 24:42] = torch.nn.functional.avg_pool2d(box, 3, stride=1, padding=1, count_include_pad=False)
    noisy = original + torch.randn(original.shape, generator=torch.Generator().manual_seed(0)) * (blurred - original).pow(2).mean().sqrt()
    assert torch.nn.functional.mse_loss(noisy, original) == pytest.approx(torch.nn.functional.mse_loss(blurred, original).item(), rel=0.2)
    assert reader_mask_loss(blurred, original) > 5 * reader_mask_loss(noisy, original)
    recon = blurred.clone().requires_grad_(True)
    reader_mask_loss(recon, original).backward()
    assert recon.grad.abs().sum() > 0


def test_training_continues_from_an_exported_model_folder(shards, tmp_path):
    """`train decoder --vae FOLDER` and `train unet --init-from FOLDER`: the shipped model's own
    weights start the runs (same latent space, same UNet) with fresh optimizers."""
    from malerei.train.diffusion import trained_diffusion_state
    from malerei.train.export import build_pipeline, export_pipeline
    from malerei.train.vae import load_trained_vae, trained_vae_state

    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    prepare_latents(shards, tmp_path / "vae", tmp_path / "latents")
    train_diffusion(TINY_UNET, tmp_path / "latents", tmp_path / "unet")
    pipe, _ = build_pipeline(tmp_path / "vae", tmp_path / "latents", tmp_path / "unet")
    model = export_pipeline(pipe, tmp_path / "model")

    # The exported folder reads back as the same weights as the runs it came from.
    run_state = load_checkpoint(tmp_path / "unet" / "checkpoint.pt")
    unet_state, text_state = trained_diffusion_state(model)
    assert _same(unet_state, run_state["ema_unet"]) and _same(text_state, run_state["ema_text"])
    assert _same(trained_vae_state(model), trained_vae_state(tmp_path / "vae"))
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_trained_vae(model).encode(x).latent_dist.mean,
                           load_trained_vae(tmp_path / "vae").encode(x).latent_dist.mean)

    # Continuing: step 0 starts from the folder's weights, and the run trains on from there.
    train_diffusion(replace(TINY_UNET, steps=1, init_from=str(model), lr=0.0), tmp_path / "latents", tmp_path / "frozen")
    assert _same(load_checkpoint(tmp_path / "frozen" / "checkpoint.pt")["unet"], run_state["ema_unet"])
    train_diffusion(replace(TINY_UNET, init_from=str(model)), tmp_path / "latents", tmp_path / "more")
    more = load_checkpoint(tmp_path / "more" / "checkpoint.pt")
    assert more["step"] == TINY_UNET.steps and not _same(more["unet"], run_state["ema_unet"])

    tuned = replace(TINY_VAE, decoder_from=str(model), mask_weight=2.0, seed=1)
    train_vae(tuned, images, tmp_path / "decoder")
    new = load_checkpoint(tmp_path / "decoder" / "checkpoint.pt")["model"]
    base = trained_vae_state(tmp_path / "vae")
    assert all(torch.equal(base[k], new[k]) for k in base if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(base[k], new[k]) for k in base if k.startswith("decoder."))

    with pytest.raises(FileNotFoundError):
        trained_diffusion_state(tmp_path / "latents")


def test_vae_evaluation_reads_shapes_per_size(shards, tmp_path):
    from malerei.train.vae import evaluate_vae, load_trained_vae

    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    metrics = evaluate_vae(load_trained_vae(tmp_path / "vae"))
    kinds = metrics["shape_originals_vs_roundtrip"]
    assert set(kinds) == {f"{size} {shape}" for size in ("small", "large") for shape in ("circle", "square", "triangle")}
    # The renderer's own large shapes always read right; a 4-step VAE's round trip does not.
    assert all(kinds[f"large {shape}"][0] == 1.0 for shape in ("circle", "square", "triangle"))
    assert metrics["adherence_roundtrip"] < metrics["adherence_originals"]


def test_object_cells_and_the_object_weighted_loss(shards, tmp_path):
    """objects.pt marks the latent cells that hold object pixels (SHAPES.md's rule), and the weighted
    loss trains on them: a run with --object-weight differs from one without, and needs objects.pt."""
    from malerei.train.diffusion import object_cells
    from malerei.world.render import render
    from malerei.world.scene import Scene, WorldObject

    square = WorldObject(shape="square", colour="red", size="small", cell=(0, 0), cx=14, cy=14, extent=8)
    cells = object_cells(render(Scene(background="blue", objects=(square,)), 64)[None], 4)[0]
    assert cells.shape == (16, 16)
    # The square spans x, y in [10, 18): latent cells 2..4 in each axis, nothing else.
    assert cells.nonzero().tolist() == [[r, c] for r in range(2, 5) for c in range(2, 5)]

    images, _ = read_shards(shards)
    train_vae(TINY_VAE, images, tmp_path / "vae")
    prepare_latents(shards, tmp_path / "vae", tmp_path / "latents")
    objects = torch.load(tmp_path / "latents" / "objects.pt", weights_only=True)
    latents = torch.load(tmp_path / "latents" / "latents.pt", weights_only=True)
    assert objects.shape == (len(images), *latents.shape[-2:]) and 0 < objects.float().mean() < 0.5
    train_diffusion(TINY_UNET, tmp_path / "latents", tmp_path / "plain")
    train_diffusion(replace(TINY_UNET, object_weight=6.0), tmp_path / "latents", tmp_path / "weighted")
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["unet"]
    weighted = load_checkpoint(tmp_path / "weighted" / "checkpoint.pt")["unet"]
    assert not _same(plain, weighted)
    (tmp_path / "latents" / "objects.pt").unlink()
    with pytest.raises(FileNotFoundError, match="objects-only"):
        train_diffusion(replace(TINY_UNET, object_weight=6.0), tmp_path / "latents", tmp_path / "missing")


def test_object_share_gives_small_objects_the_same_share_of_the_loss_as_large_ones():
    from malerei.train.diffusion import object_loss_weight

    cells = torch.zeros(3, 16, 16)
    cells[0, 2:5, 2:5] = 1  # a small object: 9 cells
    cells[1, 2:8, 2:8] = 1  # a large one: 36 cells
    # cells[2]: no object (a caption whose object the renderer clipped): plain weights
    fixed = object_loss_weight(cells, DiffusionConfig(object_weight=2.0))
    assert fixed[0, 3, 3] == fixed[1, 3, 3] == 3.0 and fixed[0, 10, 10] == 1.0 and (fixed[2] == 1).all()

    weights = object_loss_weight(cells, DiffusionConfig(object_weight=2.0, object_share=0.4))
    shares = [(w * c).sum() / w.sum() for w, c in zip(weights, cells)]
    assert shares[0] == pytest.approx(0.4) and shares[1] == pytest.approx(0.4)
    assert (weights[2] == 1).all()
    # the fixed weight stays a floor: a share below what it already gives changes nothing
    assert torch.equal(object_loss_weight(cells, DiffusionConfig(object_weight=2.0, object_share=0.01)), fixed)


def test_edit_pairs_noise_the_recoloured_twin_toward_the_captioned_image(shards, tmp_path):
    """edits.pt holds each scene on another background (none of its colours), encoded; training
    with --edit-fraction noises that twin where the caption names the background, t is in range and
    the caption was not dropped, and its target leads back to the captioned latent."""
    from malerei.train.diffusion import edit_samples, prepare_edit_latents
    from malerei.world.read import read_image
    from malerei.world.shards import read_shard_scenes, recoloured_backgrounds

    images, captions = read_shards(shards)
    scenes = read_shard_scenes(shards, 20)
    assert [s.caption for s in scenes] == captions[:20]
    twins, named = recoloured_backgrounds(scenes, 64, seed=0)
    for scene, twin, is_named in zip(scenes, twins, named):
        background = read_image(twin).background
        assert background != scene.background and background not in {o.colour for o in scene.objects}
        assert is_named == ("background" not in scene.drop)

    train_vae(TINY_VAE, images, tmp_path / "vae")
    prepare_latents(shards, tmp_path / "vae", tmp_path / "latents")
    with pytest.raises(FileNotFoundError, match="--edits"):
        train_diffusion(replace(TINY_UNET, edit_fraction=0.5), tmp_path / "latents", tmp_path / "missing")
    prepare_edit_latents(shards, tmp_path / "vae", tmp_path / "latents", 20)
    edits = torch.load(tmp_path / "latents" / "edits.pt", weights_only=True)
    latents = torch.load(tmp_path / "latents" / "latents.pt", weights_only=True)
    assert edits["latents"].shape == (20, *latents.shape[1:]) and edits["named"].tolist() == named.tolist()
    assert not torch.allclose(edits["latents"], latents[:20])

    config = replace(TINY_UNET, edit_fraction=1.0, edit_t_range=(200, 800))
    idx = torch.arange(24)
    t = torch.full((24,), 500)
    captioned = torch.ones(24, dtype=torch.bool)
    use = edit_samples(config, edits, idx, t, captioned, torch.Generator().manual_seed(0))
    assert use.tolist() == [i < 20 and bool(named[i]) for i in range(24)]  # past edits.pt: never
    assert not edit_samples(config, edits, idx, torch.full((24,), 900), captioned, torch.Generator()).any()
    assert not edit_samples(config, edits, idx, t, ~captioned, torch.Generator()).any()
    assert not edit_samples(replace(config, edit_fraction=0.0), edits, idx, t, captioned, torch.Generator()).any()

    train_diffusion(TINY_UNET, tmp_path / "latents", tmp_path / "plain")
    train_diffusion(replace(TINY_UNET, edit_fraction=1.0, edit_t_range=(0, 1000), caption_dropout=0.0),
                    tmp_path / "latents", tmp_path / "edits")
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["unet"]
    edited = load_checkpoint(tmp_path / "edits" / "checkpoint.pt")["unet"]
    assert not _same(plain, edited)
    # with no eligible sample the edit path is the plain one, weight for weight
    train_diffusion(replace(TINY_UNET, edit_fraction=1.0, edit_t_range=(0, 1)), tmp_path / "latents",
                    tmp_path / "none")
    assert _same(plain, load_checkpoint(tmp_path / "none" / "checkpoint.pt")["unet"])
