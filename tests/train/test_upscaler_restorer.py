"""The built-in upscaler / restorer: training smoke runs (a few steps, export, load through spandrel),
then the shipped files' quality floors and the CLI defaulting to them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from malerei.engine import metadata
from malerei.engine.upscale import BUILTIN_RESTORER, BUILTIN_UPSCALER, load_spandrel, load_upscaler
from malerei.restore import load_restorer
from malerei.train import restorer, upscaler

torch.set_num_threads(1)


def test_pairs_are_the_same_scene_at_two_sizes():
    low, high = upscaler.render_pairs(3, seed=5)
    assert low.shape == (3, 64, 64, 3) and high.shape == (3, 256, 256, 3)
    # The 256 px render box-averaged down to 64 px is the 64 px render (up to anti-aliasing rounding).
    down = high.reshape(3, 64, 4, 64, 4, 3).mean(axis=(2, 4))
    assert np.abs(down - low).mean() < 2.0


def test_degrade_changes_the_image_but_keeps_its_size():
    rng = np.random.default_rng(0)
    bad, good = restorer.degraded_set(2, seed=1, size=64, variants=2)
    assert bad.shape == good.shape == (4, 64, 64, 3)
    assert np.array_equal(good[0], good[1]) and not np.array_equal(bad[0], good[0])
    assert upscaler.psnr(bad, good) < 60 and restorer.degrade(good[0], rng).shape == (64, 64, 3)


def test_upscaler_trains_resumes_and_exports(tmp_path):
    config = upscaler.UpscalerConfig(num_feat=8, num_conv=2, scenes=4, crop=16, batch_size=2, steps=3,
                                     warmup=1, checkpoint_every=2, log_every=1, device="cpu")
    losses = []
    upscaler.train(config, tmp_path / "run", on_step=lambda step, stats: losses.append(stats["loss"]))
    assert len(losses) == 3 and all(np.isfinite(losses))
    config.steps = 4  # resume: one more step from the checkpoint at step 3
    upscaler.train(config, tmp_path / "run", on_step=lambda step, stats: losses.append(step))
    assert losses[-1] == 4
    path = upscaler.export(tmp_path / "run", tmp_path / "shapes-x4.safetensors")
    model = load_upscaler(path)
    assert (model.architecture, model.scale, model.purpose) == ("Compact", 4, "SR")
    report = upscaler.evaluate(model, n=2)
    assert report["scenes"] == 2 and np.isfinite(report["gain_db"])


def test_restorer_trains_and_exports(tmp_path):
    config = restorer.RestorerConfig(num_feat=8, num_conv=2, size=64, scenes=2, variants=1, crop=32, batch_size=2,
                                     steps=2, warmup=1, log_every=1, device="cpu")
    restorer.train(config, tmp_path / "run")
    path = upscaler.export(tmp_path / "run", tmp_path / "shapes-restore.safetensors")
    model = load_spandrel(path, purposes=("Restoration",), what="restorer")
    assert (model.architecture, model.scale) == ("Compact", 1)
    report = restorer.evaluate(model, n=2, size=64)
    assert report["scenes"] == 2 and np.isfinite(report["gain_db"])



# ---------------------------------------------------------------------------------------------
# The shipped models (malerei/models/upscaler, malerei/models/restorer): quality floors on the
# evaluator's scenes (never trained on), and the CLI using them when no --model is given.
# Each floor sits about 1 dB below what the shipped file measured on the same 8 scenes
# (FLOOR comments); the 100-scene figures are in the model cards.

UPSCALE_X4_FLOOR_DB = 5.3  # measured: +6.33 dB (+6.01 dB on 100 scenes)
UPSCALE_X2_FLOOR_DB = 5.1  # measured: +6.11 dB (+6.51 dB on 100 scenes)
RESTORE_FLOOR_DB = 6.4  # measured: +7.41 dB (+6.22 dB on 100 scenes)
MAX_FILE_BYTES = 2_000_000  # "small": the shipped files are a few hundred kB


def test_the_shipped_files_are_small_safetensors():
    from safetensors import safe_open

    for path in (BUILTIN_UPSCALER, BUILTIN_RESTORER):
        assert path.is_file() and path.stat().st_size < MAX_FILE_BYTES, path
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["malerei"].startswith("shapes-world")
        assert (path.parent / "README.md").is_file()  # the model card


def test_shipped_upscaler_beats_bicubic_on_unseen_scenes():
    model = load_upscaler(None)
    assert (model.name, model.architecture, model.scale, model.purpose) == ("shapes-x4", "Compact", 4, "SR")
    x4 = upscaler.evaluate(model, n=8)
    assert x4["scenes"] == 8 and x4["gain_db"] >= UPSCALE_X4_FLOOR_DB, x4
    x2 = upscaler.evaluate(model, n=8, scale=2)  # --scale 2: x4, then resized down
    assert x2["gain_db"] >= UPSCALE_X2_FLOOR_DB, x2


def test_shipped_restorer_beats_the_degraded_input_on_unseen_scenes():
    model = load_restorer(None)
    assert (model.name, model.architecture, model.scale, model.purpose) == ("shapes-restore", "Compact", 1,
                                                                            "Restoration")
    report = restorer.evaluate(model, n=8)
    assert report["scenes"] == 8 and report["gain_db"] >= RESTORE_FLOOR_DB, report


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    """An unseen scene's 64 px render as a PNG, and its true 256 px render."""
    from malerei.world.render import render

    scene = upscaler.unseen_scenes(400)[123]
    folder = tmp_path_factory.mktemp("builtin-cli")
    Image.fromarray(render(scene, 64)).save(folder / "scene.png")
    return folder / "scene.png", render(scene, 256)


def _cli(capsys, monkeypatch, tmp_path, *args) -> Path:
    """``malerei ARGS`` in-process with an empty models folder; the one path it printed."""
    from malerei.cli import main

    monkeypatch.setenv("MALEREI_MODELS_DIR", str(tmp_path / "no-models"))
    code = main([*map(str, args), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = out.splitlines()
    return Path(line)


def test_cli_upscale_uses_the_builtin_upscaler(scene_png, capsys, monkeypatch, tmp_path):
    source, truth = scene_png
    path = _cli(capsys, monkeypatch, tmp_path, "upscale", source, "--scale", 4)
    meta = metadata.read_png_metadata(path)
    assert meta.recipe["upscaler"]["name"] == "shapes-x4" and meta.params["Postprocess upscaler"] == "shapes-x4"
    ours = np.asarray(Image.open(path).convert("RGB"))
    bicubic = np.asarray(Image.open(source).resize((256, 256), Image.Resampling.BICUBIC))
    assert ours.shape == truth.shape and upscaler.psnr(ours, truth) > upscaler.psnr(bicubic, truth) + 1.0

    half = _cli(capsys, monkeypatch, tmp_path, "upscale", source, "--scale", 2)
    assert Image.open(half).size == (128, 128)
    assert metadata.read_png_metadata(half).recipe["upscaler"]["name"] == "shapes-x4"


def test_cli_restore_uses_the_builtin_restorer_and_blends_by_strength(capsys, monkeypatch, tmp_path):
    from malerei.world.render import render

    clean = render(upscaler.unseen_scenes(400)[77], 128)
    bad = restorer.degrade(clean, np.random.default_rng(3))
    Image.fromarray(bad).save(tmp_path / "bad.png")
    full = _cli(capsys, monkeypatch, tmp_path, "restore", tmp_path / "bad.png")
    assert metadata.read_png_metadata(full).recipe["restorer"]["name"] == "shapes-restore"
    fixed = np.asarray(Image.open(full).convert("RGB"))
    assert upscaler.psnr(fixed, clean) > upscaler.psnr(bad, clean) + 1.0
    half = _cli(capsys, monkeypatch, tmp_path, "restore", tmp_path / "bad.png", "--strength", 0.5)
    mixed = np.asarray(Image.open(half).convert("RGB")).astype(int)
    assert np.abs(mixed - (bad.astype(int) + fixed.astype(int)) / 2).max() <= 1


def test_bench_prints_the_figures_beside_their_baselines(capsys, tmp_path):
    """bench/change_images.py on the shipped upscaler and restorer: one table, baselines from the same run."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "bench" / "change_images.py"
    spec = importlib.util.spec_from_file_location("change_images_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--only", "upscale", "restore", "--n", "2", "--json", str(tmp_path / "report.json")])
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == (0 if report["upscale"]["pass"] and report["restore"]["pass"] else 1)
    assert f"bicubic {report['upscale']['psnr_bicubic']:.2f} dB" in table
    assert f"degraded input {report['restore']['psnr_degraded']:.2f} dB" in table
    assert table.count("| upscale x") == 2 and table.count("| restore") == 1
