"""The real ``malerei`` CLI in a subprocess, on a tiny fixture model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from malerei.engine import metadata

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALEREI_MODELS_DIR=str(cwd / "no-models"))
    return subprocess.run([sys.executable, "-m", "malerei", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def paths_of(result) -> list[Path]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.strip() == line and line for line in lines)
    return [Path(line) for line in lines]


@pytest.fixture(scope="module")
def first_run(tiny_sd1, tmp_path_factory):
    """One generate: batch 2, seed 5, into a fresh folder."""
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli("generate", "a red circle", "--negative", "blue", "--model", tiny_sd1.folder,
                     "--steps", 2, "--batch", 2, "--seed", 5, "--cfg", 6, "--out", "out", cwd=cwd)
    return cwd, result


def test_generate_prints_each_path_and_writes_metadata(first_run):
    cwd, result = first_run
    paths = paths_of(result)
    assert [p.name for p in paths] == ["00000-5.png", "00001-6.png"]
    for path, seed in zip(paths, (5, 6), strict=True):
        full = cwd / path
        assert full.is_file() and full.parent == cwd / "out"
        meta = metadata.read_png_metadata(full)
        assert meta.params["Prompt"] == "a red circle" and meta.params["Negative prompt"] == "blue"
        assert meta.params["Seed"] == str(seed) and meta.params["Steps"] == "2" and meta.params["CFG scale"] == "6"
        assert meta.recipe["params"]["seed"] == seed and meta.recipe["model"]["name"] == "tiny-sd1"
        assert Image.open(full).size == (64, 64)
    assert "it/s" in result.stderr  # progress and speed go to stderr, never to stdout


def test_prompt_file_seeds_and_numbering(first_run, tiny_sd1):
    cwd, first = first_run
    paths_of(first)
    (cwd / "prompts.txt").write_text("a red circle\n\n  a blue square  \na green triangle\n", encoding="utf-8")
    result = run_cli("generate", "--prompt-file", "prompts.txt", "--model", tiny_sd1.folder, "--steps", 2,
                     "--seed", 100, "--out", "out", cwd=cwd)
    paths = paths_of(result)
    # Numbering continues after the files already there (never overwriting); line i gets seed 100+i.
    assert [p.name for p in paths] == ["00002-100.png", "00003-101.png", "00004-102.png"]
    prompts = [metadata.read_png_metadata(cwd / p).params["Prompt"] for p in paths]
    assert prompts == ["a red circle", "a blue square", "a green triangle"]
    assert len(list((cwd / "out").glob("*.png"))) == 5


def test_from_gives_identical_pixels_and_info_prints_the_recipe(first_run):
    cwd, first = first_run
    original = cwd / paths_of(first)[1]  # image 2 of a batch of 2
    result = run_cli("generate", "--from", original, "--out", "again", cwd=cwd)
    [path] = paths_of(result)
    assert path.name == "00000-6.png"
    assert np.array_equal(np.asarray(Image.open(cwd / path)), np.asarray(Image.open(original)))
    assert metadata.read_png_metadata(cwd / path).infotext == metadata.read_png_metadata(original).infotext

    info = run_cli("info", original, cwd=cwd)
    assert info.returncode == 0 and "Traceback" not in info.stderr
    assert "Seed: 6" in info.stdout and '"short_hash"' in info.stdout and "made by malerei" in info.stdout


def test_info_reads_an_a1111_png(tmp_path):
    text = ("a cat, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
            "Model: v1-5-pruned-emaonly, Version: v1.10.1")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    result = run_cli("info", "a1111.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "made by A1111" in result.stdout and "Steps: 20, Sampler: DPM++ 2M" in result.stdout
    assert '"seed": 42' in result.stdout and '"width": 512' in result.stdout


BAD_INPUTS = {
    "unknown sampler": (["generate", "a cat", "--sampler", "Nope"], "unknown sampler"),
    "width not a multiple of 8": (["generate", "a cat", "--width", "60"], "multiple of 8"),
    "steps not a number": (["generate", "a cat", "--steps", "abc"], "invalid int value"),
    "missing model": (["generate", "a cat", "--model", "./no/such/model"], "no such file"),
    "model name not found": (["generate", "a cat", "--model", "nope"], "no model named"),
    "corrupt model": (["generate", "a cat", "--model", "corrupt.safetensors"], "corrupt"),
    "unreadable image (info)": (["info", "junk.png"], "not an image"),
    "missing image (--from)": (["generate", "--from", "missing.png"], "no such file"),
    "empty prompt file": (["generate", "--prompt-file", "empty.txt"], "no prompts"),
    "missing prompt file": (["generate", "--prompt-file", "nothing.txt"], "no such file"),
    "no prompt at all": (["generate"], "nothing to generate"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(name, tmp_path):
    args, words = BAD_INPUTS[name]
    (tmp_path / "junk.png").write_bytes(b"this is not a PNG")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    (tmp_path / "empty.txt").write_text("\n   \n", encoding="utf-8")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_generate_with_hires_fix_writes_the_larger_image(tiny_sd1, tmp_path):
    from PIL import Image

    from malerei.engine.metadata import read_png_metadata

    result = run_cli("generate", "a red circle", "--model", tiny_sd1.folder, "--steps", 2, "--seed", 5,
                     "--width", 64, "--height", 64, "--hires-scale", 2, "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [path] = paths_of(result)
    path = tmp_path / path
    assert Image.open(path).size == (128, 128)
    assert "Hires upscale: 2" in read_png_metadata(path).infotext

    # --from remakes both passes: the same pixels at the same size.
    again = run_cli("generate", "--from", path, "--out", "again", cwd=tmp_path)
    [copy] = paths_of(again)
    assert np.array_equal(np.asarray(Image.open(tmp_path / copy)), np.asarray(Image.open(path)))
    assert read_png_metadata(tmp_path / copy).infotext == read_png_metadata(path).infotext
    # A1111's infotext alone (no malerei recipe) carries the hires fix too.
    info = Image.open(path).info["parameters"]
    a1111 = tmp_path / "a1111.png"
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("parameters", info)
    Image.open(path).save(a1111, pnginfo=chunk)
    from_text = run_cli("generate", "--from", a1111, "--model", tiny_sd1.folder, "--out", "text", cwd=tmp_path)
    [copy] = paths_of(from_text)
    assert Image.open(tmp_path / copy).size == (128, 128)


def test_bad_hires_scale_is_one_line(tiny_sd1, tmp_path):
    result = run_cli("generate", "a red circle", "--model", tiny_sd1.folder, "--hires-scale", 9, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_continuation_flags_refuse_what_is_not_a_model(tmp_path):
    """`train unet --init-from` and `train decoder --vae` name a run or an exported model folder;
    anything else is one line and exit 2, and no run directory is started."""
    (tmp_path / "latents").mkdir()
    (tmp_path / "data").mkdir()
    for args in (("train", "unet", "--latents", "latents", "--run", "run", "--init-from", "nothing-here"),
                 ("train", "decoder", "--vae", "nothing-here", "--data", "data", "--run", "run"),
                 ("train", "decoder", "--vae", REPO / "malerei" / "models" / "shapes", "--data", "data", "--run", "run",
                  "--mask-weight", "-1")):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "run").exists()
