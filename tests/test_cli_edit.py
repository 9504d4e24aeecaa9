"""The real CLI in a subprocess: img2img, inpaint, outpaint, upscale, restore, grid, and their errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import image_nets
import numpy as np
import pytest
from PIL import Image

from malerei.engine import metadata

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALEREI_MODELS_DIR=str(cwd / "no-models"))
    return subprocess.run([sys.executable, "-m", "malerei", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def paths_of(result, cwd: Path) -> list[Path]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.strip() == line and line for line in lines)
    return [cwd / line for line in lines]


def one_error(result, *words: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli-edit")
    image = Image.new("RGBA", (64, 64), (40, 90, 220, 255))
    image.paste((220, 40, 40, 255), (16, 16, 32, 32))
    image.save(cwd / "scene.png")
    cutout = image.copy()
    cutout.paste((0, 0, 0, 0), (24, 24, 48, 48))
    cutout.save(cwd / "cutout.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 48, 48))
    mask.save(cwd / "mask.png")
    Image.new("L", (32, 32), 255).save(cwd / "small-mask.png")
    (cwd / "notes.png").write_text("not an image at all")
    image_nets.save(image_nets.esrgan_state(4), cwd / "ESRGAN_x4.pth")
    image_nets.save(image_nets.realesrgan_state(4), cwd / "RealESRGAN_x4.safetensors")
    image_nets.save(image_nets.compact_state(1), cwd / "1x-restore.safetensors")
    return cwd


def test_img2img_writes_pngs_with_metadata(work, tiny_sd1):
    result = run_cli("img2img", "scene.png", "a red circle", "--strength", 0.5, "--model", tiny_sd1.folder,
                     "--steps", 4, "--seed", 3, "--batch", 2, "--out", "out", cwd=work)
    paths = paths_of(result, work)
    assert [p.name for p in paths] == ["00000-3.png", "00001-4.png"]
    meta = metadata.read_png_metadata(paths[0])
    assert meta.params["Denoising strength"] == "0.5" and meta.params["Seed"] == "3"
    assert meta.recipe["kind"] == "img2img" and meta.recipe["img2img"]["strength"] == 0.5
    assert "it/s" in result.stderr


def test_inpaint_with_mask_and_with_alpha(work, tiny_sd1):
    result = run_cli("inpaint", "scene.png", "--mask", "mask.png", "a green square", "--model", tiny_sd1.folder,
                     "--steps", 3, "--seed", 5, "--mask-blur", 2, "--strength", 1, "--masked-content", "latent noise",
                     "--out", "inpainted", cwd=work)
    [path] = paths_of(result, work)
    out = np.asarray(Image.open(path)).astype(int)
    source = np.asarray(Image.open(work / "scene.png").convert("RGB")).astype(int)
    assert np.array_equal(out[:16], source[:16])  # far from the mask: untouched
    meta = metadata.read_png_metadata(path)
    assert meta.params["Masked content"] == "latent noise" and meta.recipe["kind"] == "inpaint"

    result = run_cli("inpaint", "cutout.png", "a green square", "--model", tiny_sd1.folder, "--steps", 3,
                     "--only-masked", "--padding", 8, "--out", "inpainted", cwd=work)
    [path] = paths_of(result, work)
    assert metadata.read_png_metadata(path).params["Inpaint area"] == "Only masked"


def test_outpaint_grows_the_canvas(work, tiny_sd1):
    result = run_cli("outpaint", "scene.png", "a red circle", "--left", 16, "--down", 8, "--model", tiny_sd1.folder,
                     "--steps", 3, "--out", "outpainted", cwd=work)
    [path] = paths_of(result, work)
    assert Image.open(path).size == (80, 72)
    assert metadata.read_png_metadata(path).recipe["outpaint"]["extend"]["left"] == 16


@pytest.mark.parametrize("args, words", [
    (("inpaint", "scene.png", "--mask", "small-mask.png", "x"), ("mask is 32x32", "64x64")),
    (("img2img", "notes.png", "x"), ("unsupported file",)),
    (("img2img", "missing.png", "x"), ("no such file",)),
    (("img2img", "scene.png", "x", "--strength", 1.5), ("denoising strength 1.5", "allowed")),
    (("img2img", "scene.png", "x", "--strength", "abc"), ("--strength",)),
    (("inpaint", "scene.png", "x"), ("fully opaque",)),
    (("outpaint", "scene.png", "x"), ("nothing to outpaint",)),
    (("upscale", "scene.png", "--scale", 0), ("upscale factor",)),
    (("upscale", "scene.png", "--model", "ESRGAN_x4.pth"), ("pickle", "--allow-pickle")),
    (("upscale", "scene.png", "--model", "no-such-upscaler"), ("no upscaler named",)),
    (("restore", "scene.png", "--model", "1x-restore.safetensors", "--strength", 2), ("restore strength",)),
    (("restore", "scene.png", "--model", "RealESRGAN_x4.safetensors"), ("is not a restorer",)),
    (("grid", "a red circle", "--x", "colour:1,2"), ("unknown axis type",)),
    (("grid", "a red circle", "--x", "prompt:blue,green"), ("does not occur in the prompt",)),
    (("grid", "a red circle", "--x", "strength:0.3,0.6"), ("needs an input image",)),
])
def test_errors_are_one_line_and_exit_2(work, args, words):
    one_error(run_cli(*args, cwd=work), *words)


def test_upscale_and_restore(work):
    result = run_cli("upscale", "scene.png", "--scale", 2, "--model", "ESRGAN_x4.pth", "--allow-pickle",
                     "--tile", 24, "--out", "big", cwd=work)
    [path] = paths_of(result, work)
    assert Image.open(path).size == (128, 128)
    meta = metadata.read_png_metadata(path)
    assert meta.params["Postprocess upscale by"] == "2" and meta.recipe["upscaler"]["architecture"] == "ESRGAN"
    assert meta.recipe["source"]["size"] == [64, 64]

    models = work / "models" / "RealESRGAN"
    models.mkdir(parents=True, exist_ok=True)
    (models / "4x-Tiny.safetensors").write_bytes((work / "RealESRGAN_x4.safetensors").read_bytes())
    result = run_cli("upscale", "scene.png", "cutout.png", "--model", "4x-Tiny", "--models-dir", "models",
                     "--out", "big", cwd=work)
    assert [Image.open(p).size for p in paths_of(result, work)] == [(256, 256), (256, 256)]

    result = run_cli("restore", path, "--model", "1x-restore.safetensors", "--strength", 0.5, "--out", "fixed",
                     cwd=work)
    [fixed] = paths_of(result, work)
    meta = metadata.read_png_metadata(fixed)
    assert Image.open(fixed).size == (128, 128) and meta.params["Postprocess restore strength"] == "0.5"
    assert meta.params["Postprocess upscale by"] == "2"  # the source's infotext is kept
    assert meta.recipe["source"]["recipe"]["kind"] == "upscale"


def test_grid_is_one_labelled_png(work, tiny_sd1):
    result = run_cli("grid", "a red circle", "--x", "steps:1-2", "--y", "prompt:red,green", "--model", tiny_sd1.folder,
                     "--seed", 9, "--out", "grids", cwd=work)
    [path] = paths_of(result, work)
    sheet = Image.open(path)
    assert sheet.width > 2 * 64 and sheet.height > 2 * 64  # cells plus label margins
    meta = metadata.read_png_metadata(path)
    assert meta.recipe["kind"] == "grid" and len(meta.recipe["cells"]) == 4
    assert [a["type"] for a in meta.recipe["axes"]] == ["steps", "prompt"]
    texts = [c["infotext"] for c in meta.recipe["cells"]]
    assert sum("a green circle" in t for t in texts) == 2 and all("Seed: 9" in t for t in texts)

    result = run_cli("grid", "a red circle", "--init", "scene.png", "--x", "strength:0.3,0.6", "--model",
                     tiny_sd1.folder, "--steps", 2, "--out", "grids", cwd=work)
    [path] = paths_of(result, work)
    cells = metadata.read_png_metadata(path).recipe["cells"]
    assert ["Denoising strength: 0.3" in cells[0]["infotext"], "Denoising strength: 0.6" in cells[1]["infotext"]] == \
        [True, True]
