"""The shipped built-in model: stock diffusers runs it, and it keeps a floor of prompt adherence.

The floors sit a margin below what the shipped weights measured on the same prompts and seeds
(model card), so a change that breaks the model, the pipeline or the reader cannot land.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL = Path(__file__).resolve().parents[2] / "malerei" / "models" / "shapes"

# Measured on the quick eval set with the shipped weights (see the model card); floors leave room
# for float differences between machines, not for a broken model.
FLOORS = json.loads((MODEL / "floors.json").read_text()) if (MODEL / "floors.json").exists() else {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_shipped_folder_is_small_and_safetensors_only():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".ckpt", ".pt", ".pth", ".pkl"}]
    assert (MODEL / "README.md").exists() and (MODEL / "model_index.json").exists()


def test_stock_diffusers_loads_and_runs_it_without_malerei():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "img = pipe('a large red circle in the center on a blue background', num_inference_steps=4,\n"
        "           generator=torch.Generator('cpu').manual_seed(0), output_type='np').images[0]\n"
        "assert img.shape == (64, 64, 3), img.shape\n"
        "print('ok', 'malerei' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(MODEL)], capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", "False"]


def test_adherence_floor_on_the_quick_prompt_set():
    from malerei.engine.batch import generate_many
    from malerei.engine.loading import load_model
    from malerei.engine.pipeline import GenerationParams
    from malerei.train.evaluate import score
    from malerei.world.eval_set import small_eval_cases

    assert FLOORS, "malerei/models/shapes/floors.json is missing"
    model = load_model(None, device="cpu")
    cases = small_eval_cases()
    images = []
    for i in range(0, len(cases), 16):
        chunk = cases[i : i + 16]
        params = [GenerationParams(prompt=c.caption, seed=c.seed) for c in chunk]
        images += [np.asarray(r[0].image.convert("RGB")) for r in generate_many(model, params, preview_every=0)]
    summary = score(cases, images)["summary"]
    for group, floors in FLOORS.items():
        for attribute, floor in floors.items():
            assert summary[group][attribute] >= floor, (group, attribute, summary[group][attribute], floor)


def test_img2img_follows_a_new_background_in_the_prompt():
    """The built-in model is trained on edit pairs: at strength 0.5 a prompt naming another
    background recolours it and keeps the object (the full figure is bench/change_images.py's)."""
    from dataclasses import replace

    from PIL import Image

    from malerei.engine import img2img
    from malerei.engine.loading import load_model
    from malerei.engine.pipeline import GenerationParams
    from malerei.world.eval_set import small_eval_cases
    from malerei.world.read import read_image
    from malerei.world.render import render
    from malerei.world.vocab import COLOURS

    model = load_model(None, device="cpu")
    cases = [c for c in small_eval_cases() if len(c.scene.objects) == 1][:12]
    new_background = kept_colour = 0
    for i, case in enumerate(cases):
        obj = case.scene.objects[0]
        others = [c for c in COLOURS if c not in (obj.colour, case.scene.background)]
        target = replace(case.scene, background=others[i % len(others)])
        params = GenerationParams(prompt=target.caption, seed=case.seed)
        [result] = img2img.img2img(model, params, Image.fromarray(render(case.scene, 64)), strength=0.5)
        reading = read_image(np.asarray(result.image))
        new_background += reading.background == target.background
        kept_colour += bool(reading.objects) and reading.objects[0].colour == obj.colour
    assert new_background >= 10 and kept_colour >= 10, (new_background, kept_colour)
