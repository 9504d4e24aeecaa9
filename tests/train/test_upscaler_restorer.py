"""Smoke runs of the built-in upscaler / restorer training: a few steps, export, load through spandrel."""

from __future__ import annotations

import numpy as np
import torch

from malerei.engine.upscale import load_spandrel, load_upscaler
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
