"""Tests for malerei.engine.metadata: A1111 infotext format/parse, PNG chunks, recipe."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from malerei.engine.errors import ImageError, InvalidParameter
from malerei.engine.metadata import (
    ImageMetadata,
    build_recipe,
    format_infotext,
    infotext_to_params,
    library_versions,
    malerei_version,
    parse_hashes,
    parse_infotext,
    read_png_metadata,
    write_png,
)

# ------------------------------------------------------------------------------------------
# format_infotext
# ------------------------------------------------------------------------------------------


def test_format_basic_a1111_line():
    text = format_infotext(
        prompt="a cat",
        negative_prompt="blurry",
        params={
            "Model": "name",
            "Seed": 123,
            "Steps": 20,
            "Size": (512, 512),
            "CFG scale": 7.0,
            "Schedule type": "Karras",
            "Sampler": "DPM++ 2M",
            "Model hash": "abcdef1234",
            "Version": "malerei 0.1.0",
        },
    )
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, "
        "Size: 512x512, Model hash: abcdef1234, Model: name, Version: malerei 0.1.0"
    )


def test_format_default_version_and_no_negative_line():
    text = format_infotext(prompt="a cat", negative_prompt="", params={"Steps": 20, "Sampler": "Euler a", "Seed": 1})
    assert text == f"a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Version: malerei {malerei_version()}"
    assert "Negative prompt" not in text
    assert format_infotext(prompt="x", params={"Steps": 1, "Seed": 2, "Sampler": "Euler", "Version": None}).endswith("Seed: 2")


def test_format_numbers_like_a1111():
    text = format_infotext(prompt="p", params={
        "Steps": 20, "CFG scale": 7.5, "Seed": 4294967295, "Denoising strength": 0.7,
        "Hires upscale": 2.0, "Tiling": True, "Hires fix": "Hires fix", "Version": None,
    })
    assert text == (
        "p\nSteps: 20, CFG scale: 7.5, Seed: 4294967295, Denoising strength: 0.7, Tiling: True, "
        "Hires upscale: 2, Hires fix"  # a value equal to its key prints as the bare key, as in A1111
    )


def test_format_variation_seed_and_clip_skip_rules():
    base = {"Steps": 20, "Sampler": "Euler", "Seed": 1, "Version": None}
    without = format_infotext(prompt="p", params={**base, "Variation seed": 99, "Variation seed strength": 0, "Clip skip": 1})
    assert "Variation seed" not in without and "Clip skip" not in without
    no_strength = format_infotext(prompt="p", params={**base, "Variation seed": 99})
    assert "Variation seed" not in no_strength
    with_ = format_infotext(prompt="p", params={**base, "Variation seed": 99, "Variation seed strength": 0.25, "Clip skip": 2})
    assert "Variation seed: 99, Variation seed strength: 0.25" in with_ and "Clip skip: 2" in with_
    with pytest.raises(InvalidParameter, match="Clip skip"):
        format_infotext(prompt="p", params={**base, "Clip skip": "2"})


def test_format_order_follows_a1111():
    params = {
        "Version": "malerei 1", "Lora hashes": {"add_detail": "7c6bad76eb54"}, "My extension": "on",
        "Hires upscaler": "Latent", "Hires steps": 10, "Hires upscale": 2, "Clip skip": 2,
        "Denoising strength": 0.5, "Variation seed strength": 0.1, "Variation seed": 5, "Model": "m",
        "Model hash": "h", "Size": "512x768", "Seed": 3, "CFG scale": 6, "Schedule type": "Automatic",
        "Sampler": "Euler a", "Steps": 9,
    }
    line = format_infotext(prompt="p", params=params).split("\n")[-1]
    assert line.startswith("Steps: 9, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 3, Size: 512x768, ")
    assert line.endswith('Lora hashes: "add_detail: 7c6bad76eb54", My extension: on, Version: malerei 1')
    parsed = parse_infotext(format_infotext(prompt="p", params=params))
    assert list(parsed)[2:] == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash",
        "Model", "Variation seed", "Variation seed strength", "Denoising strength", "Clip skip",
        "Hires upscale", "Hires steps", "Hires upscaler", "Lora hashes", "My extension", "Version",
    ]


def test_format_quoting():
    text = format_infotext(prompt="p", params={
        "Steps": 1, "Sampler": "Euler", "Model": "my, model: v2", "Hires prompt": 'say "hi"',
        "Lora hashes": {"a:b,c": "123", "d": "456"}, "Version": None,
    })
    assert 'Model: "my, model: v2"' in text
    assert 'Hires prompt: "say \\"hi\\""' in text
    assert 'Lora hashes: "abc: 123, d: 456"' in text


@pytest.mark.parametrize(
    "params",
    [
        {"Steps": 1, "Bad:key": 1},
        {"Steps": 1, "Prompt": "x"},
        {"Steps": 1, "x": 1},  # keys need at least two characters, like A1111's parser
        {"Steps": 1, "CFG scale": float("nan")},
    ],
)
def test_format_rejects_bad_params(params):
    with pytest.raises(InvalidParameter):
        format_infotext(prompt="p", params=params)


# ------------------------------------------------------------------------------------------
# parse_infotext: literal A1111 infotexts
# ------------------------------------------------------------------------------------------

A1111_OLD = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

A1111_MODERN = """masterpiece, best quality, 1girl, <lora:add_detail:0.5>
standing in a field of flowers
Negative prompt: EasyNegative, lowres,
bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3821571392, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54, more_art: 1a2b3c4d5e6f", TI hashes: "EasyNegative: c74b4e810b03", Version: v1.10.1"""

A1111_VARIATION = """a "quoted" word
Steps: 30, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 1, Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Variation seed: 42, Variation seed strength: 0.3, Seed resize from: 768x768, Hires prompt: "a \\"quoted\\" word, detailed: yes", Emphasis: No norm, Version: v1.9.4"""


def test_parse_old_a1111():
    res = parse_infotext(A1111_OLD)
    assert res["Prompt"].startswith("girl with an artist's beret") and res["Prompt"].endswith("intricate")
    assert res["Negative prompt"].startswith("ugly, fat") and res["Negative prompt"].endswith("messy drawing")
    assert res["Steps"] == "20" and res["Sampler"] == "Euler a" and res["CFG scale"] == "7"
    assert res["Seed"] == "965400086" and res["Model hash"] == "45dee52b"
    assert res["Size-1"] == "512" and res["Size-2"] == "512" and "Size" not in res


def test_parse_modern_a1111_multiline_and_hashes():
    res = parse_infotext(A1111_MODERN)
    assert res["Prompt"] == "masterpiece, best quality, 1girl, <lora:add_detail:0.5>\nstanding in a field of flowers"
    assert res["Negative prompt"] == "EasyNegative, lowres,\nbad hands"
    assert (res["Size-1"], res["Size-2"]) == ("512", "768")
    assert res["Schedule type"] == "Karras" and res["Clip skip"] == "2"
    assert res["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert res["VAE"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54, more_art: 1a2b3c4d5e6f"
    assert parse_hashes(res["Lora hashes"]) == {"add_detail": "7c6bad76eb54", "more_art": "1a2b3c4d5e6f"}
    assert parse_hashes(res["TI hashes"]) == {"EasyNegative": "c74b4e810b03"}
    assert res["Version"] == "v1.10.1"


def test_parse_variation_and_escaped_quotes():
    res = parse_infotext(A1111_VARIATION)
    assert res["Prompt"] == 'a "quoted" word' and res["Negative prompt"] == ""
    assert res["Variation seed"] == "42" and res["Variation seed strength"] == "0.3"
    assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("768", "768")
    assert res["Hires prompt"] == 'a "quoted" word, detailed: yes'
    assert res["Emphasis"] == "No norm"


def test_parse_prompt_only_and_short_last_line():
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
    # a last line with fewer than three pairs is part of the prompt, as in A1111
    res = parse_infotext("a cat\nStyle: nice, Mood: calm")
    assert res == {"Prompt": "a cat\nStyle: nice, Mood: calm", "Negative prompt": ""}
    assert parse_infotext("")["Prompt"] == ""


def test_infotext_to_params_typed():
    p = infotext_to_params(parse_infotext(A1111_MODERN))
    assert p["prompt"].startswith("masterpiece") and p["negative_prompt"] == "EasyNegative, lowres,\nbad hands"
    assert (p["steps"], p["sampler"], p["scheduler"]) == (28, "DPM++ 2M", "Karras")
    assert p["cfg_scale"] == 7.5 and p["seed"] == 3821571392
    assert (p["width"], p["height"]) == (512, 768)
    assert p["clip_skip"] == 2 and p["denoising_strength"] == 0.45
    assert p["hires_upscale"] == 2.0 and p["hires_steps"] == 15
    assert p["lora_hashes"] == {"add_detail": "7c6bad76eb54", "more_art": "1a2b3c4d5e6f"}
    assert p["vae_hash"] == "735e4c3a44" and p["extra"] == {}
    old = infotext_to_params(parse_infotext(A1111_OLD))
    assert old["clip_skip"] == 1 and old["model_hash"] == "45dee52b"
    v = infotext_to_params(parse_infotext(A1111_VARIATION))
    assert (v["subseed"], v["subseed_strength"]) == (42, 0.3)
    with pytest.raises(InvalidParameter, match="'Steps' must be an integer"):
        infotext_to_params(parse_infotext("p\nSteps: many, Sampler: Euler, Seed: 1"))


# ------------------------------------------------------------------------------------------
# round trip format -> parse
# ------------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    ("a cat", "", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": (512, 512)}),
    ("a (red:1.2) cat, [blue] dog", "blurry, lowres", {
        "Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 6.5, "Seed": 4294967294,
        "Size": (768, 512), "Model hash": "abcdef1234", "Model": "my model"}),
    ("line one\nline two", "neg one\nneg two", {
        "Steps": 8, "Sampler": "LCM", "CFG scale": 1.5, "Seed": 0, "Size": "64x64",
        "Variation seed": 7, "Variation seed strength": 0.5, "Clip skip": 2}),
    ("ünïcödé 猫 prompt", "日本語", {"Steps": 5, "Sampler": "Euler", "Seed": 9, "Model": "modèle: α, β"}),
    ('a "quoted", prompt: yes', "", {
        "Steps": 12, "Sampler": "DDIM", "Seed": 3, "Hires prompt": 'x, "y": z\nw', "Hires upscale": 1.5,
        "Hires steps": 4, "Hires upscaler": "Latent (nearest-exact)", "Denoising strength": 0.55}),
    ("", "only negative", {"Steps": 1, "Sampler": "Euler", "Seed": 1}),
    ("p", "", {"Steps": 20, "Sampler": "Euler", "Seed": 5, "Lora hashes": {"a": "111", "b": "222"},
               "TI hashes": {"emb": "333"}, "Emphasis": "No norm", "Tiling": True}),
]


@pytest.mark.parametrize(("prompt", "negative", "params"), ROUND_TRIP_CASES)
def test_round_trip(prompt, negative, params):
    text = format_infotext(prompt=prompt, negative_prompt=negative, params=params)
    res = parse_infotext(text)
    assert res.pop("Prompt") == prompt
    assert res.pop("Negative prompt") == negative
    assert res.pop("Version") == f"malerei {malerei_version()}"
    expected = {}
    strength = params.get("Variation seed strength")
    for key, value in params.items():
        if key in ("Variation seed", "Variation seed strength") and not strength:
            continue
        if key == "Clip skip" and value <= 1:
            continue
        if key == "Size":
            w, h = value if isinstance(value, tuple) else value.split("x")
            expected["Size-1"], expected["Size-2"] = str(w), str(h)
        elif isinstance(value, dict):
            expected[key] = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float) and value.is_integer():
            expected[key] = str(int(value))
        else:
            expected[key] = str(value)
    assert res == expected


# ------------------------------------------------------------------------------------------
# PNG write / read
# ------------------------------------------------------------------------------------------


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each PNG chunk, read by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


@pytest.fixture
def image():
    img = Image.new("RGB", (16, 8), (10, 20, 30))
    img.putpixel((3, 4), (200, 100, 0))
    return img


def test_png_round_trip(tmp_path, image):
    infotext = format_infotext(prompt="a cat", negative_prompt="dog", params={"Steps": 20, "Sampler": "Euler a", "Seed": 5})
    recipe = build_recipe(params={"prompt": "a cat", "seed": 5}, model_name="shapes", model_family="sd1",
                          model_hash="abc", file_hashes={"unet.safetensors": "f" * 64}, device="cpu", dtype="float32")
    path = write_png(image, tmp_path / "out.png", infotext=infotext, recipe=recipe)
    meta = read_png_metadata(path)
    assert meta == ImageMetadata(infotext=infotext, params=parse_infotext(infotext), recipe=recipe)
    # stock PIL (what A1111 uses) sees the same 'parameters' text
    with Image.open(path) as again:
        assert again.text["parameters"] == infotext
        assert again.convert("RGB").tobytes() == image.tobytes()
    kinds = [k for k, _ in _chunks(path.read_bytes())]
    assert kinds.count(b"tEXt") == 2 and b"iTXt" not in kinds


def test_png_non_latin1_uses_itxt(tmp_path, image):
    infotext = "猫 ünïcode\nSteps: 1, Sampler: Euler, Seed: 2"
    recipe = {"params": {"prompt": "猫 🐈"}}
    path = write_png(image, tmp_path / "u.png", infotext=infotext, recipe=recipe)
    chunks = dict(_chunks(path.read_bytes()))
    assert b"iTXt" in chunks
    meta = read_png_metadata(str(path))
    assert meta.infotext == infotext and meta.recipe == recipe
    assert meta.params["Prompt"] == "猫 ünïcode"


def test_png_latin1_infotext_is_plain_text_chunk(tmp_path, image):
    path = write_png(image, tmp_path / "l.png", infotext="café\nSteps: 1, Sampler: Euler, Seed: 2", recipe=None)
    texts = [payload for kind, payload in _chunks(path.read_bytes()) if kind == b"tEXt"]
    assert texts == [b"parameters\0caf\xe9\nSteps: 1, Sampler: Euler, Seed: 2"]
    assert read_png_metadata(path).recipe is None


def test_png_without_metadata(tmp_path, image):
    path = tmp_path / "plain.png"
    image.save(path)
    assert read_png_metadata(path) == ImageMetadata(infotext=None, params={}, recipe=None)


def test_png_read_from_bytes_and_file(tmp_path, image):
    path = write_png(image, tmp_path / "b.png", infotext="p\nSteps: 1, Sampler: Euler, Seed: 2", recipe={"a": 1})
    data = path.read_bytes()
    assert read_png_metadata(data).recipe == {"a": 1}
    with open(path, "rb") as f:
        assert read_png_metadata(f).params["Seed"] == "2"


def test_png_write_is_atomic(tmp_path, image):
    target = tmp_path / "x.png"
    write_png(image, target, infotext="first\nSteps: 1, Sampler: Euler, Seed: 2", recipe=None)
    before = target.read_bytes()
    # a mode PNG cannot hold: the save fails, the old file stays, no temporary file is left
    with pytest.raises(ImageError, match="cannot write PNG"):
        write_png(Image.new("CMYK", (4, 4)), target, infotext="second", recipe=None)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    write_png(image, target, infotext="second\nSteps: 1, Sampler: Euler, Seed: 3", recipe=None)
    assert read_png_metadata(target).params["Seed"] == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_png_write_errors(tmp_path, image):
    with pytest.raises(ImageError, match="cannot write PNG"):
        write_png(image, tmp_path / "missing" / "x.png", infotext=None, recipe=None)
    with pytest.raises(ImageError, match="PIL image"):
        write_png("not an image", tmp_path / "x.png", infotext=None, recipe=None)
    with pytest.raises(InvalidParameter, match="JSON"):
        write_png(image, tmp_path / "x.png", infotext=None, recipe={"x": object()})


# ------------------------------------------------------------------------------------------
# unreadable files
# ------------------------------------------------------------------------------------------


def _one_line_image_error(call):
    with pytest.raises(ImageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_read_missing_file(tmp_path):
    assert "no such file" in _one_line_image_error(lambda: read_png_metadata(tmp_path / "nope.png"))


def test_read_folder(tmp_path):
    assert "folder" in _one_line_image_error(lambda: read_png_metadata(tmp_path))


def test_read_non_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text")
    assert "not an image" in _one_line_image_error(lambda: read_png_metadata(path))
    assert "not an image" in _one_line_image_error(lambda: read_png_metadata(b"\x00" * 100))


def test_read_truncated_png(tmp_path, image):
    path = write_png(image.resize((64, 64)), tmp_path / "t.png", infotext="p\nSteps: 1, Sampler: Euler, Seed: 2", recipe=None)
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) - 40])
    assert "corrupt or truncated" in _one_line_image_error(lambda: read_png_metadata(cut))


def test_read_png_with_broken_pixel_data(tmp_path, image):
    data = bytearray(write_png(image, tmp_path / "c.png", infotext=None, recipe=None).read_bytes())
    # damage the compressed pixel data and fix up the chunk CRC so only zlib notices
    pos = 8
    while data[pos + 4 : pos + 8] != b"IDAT":
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]
    length = struct.unpack(">I", data[pos : pos + 4])[0]
    for i in range(pos + 10, pos + 8 + length):
        data[i] ^= 0x5A
    data[pos + 8 + length : pos + 12 + length] = struct.pack(">I", zlib.crc32(bytes(data[pos + 4 : pos + 8 + length])))
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    assert "corrupt" in _one_line_image_error(lambda: read_png_metadata(bad))


def test_read_bad_recipe_json(tmp_path, image):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("malerei", "{not json")
    path = tmp_path / "r.png"
    image.save(path, pnginfo=info)
    assert "not valid JSON" in _one_line_image_error(lambda: read_png_metadata(path))


def test_read_bad_argument():
    assert "give a path" in _one_line_image_error(lambda: read_png_metadata(12))


# ------------------------------------------------------------------------------------------
# A1111 JPEG / WebP: EXIF UserComment
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_read_exif_user_comment(image, fmt):
    text = "a cat, ünï\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")  # as piexif writes it
    buf = io.BytesIO()
    image.save(buf, format=fmt, exif=exif)
    meta = read_png_metadata(buf.getvalue())
    assert meta.infotext == text
    assert meta.params["Negative prompt"] == "dog" and meta.params["Steps"] == "20"
    assert meta.recipe is None


def test_read_jpeg_without_exif(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    assert read_png_metadata(buf.getvalue()) == ImageMetadata(infotext=None, params={}, recipe=None)


# ------------------------------------------------------------------------------------------
# build_recipe
# ------------------------------------------------------------------------------------------


def _recipe(**over):
    import torch

    kwargs = dict(
        params={"prompt": "a cat", "seed": 5, "size": (512, 512), "cfg_scale": 7.0},
        model_name="shapes",
        model_family="sd1",
        model_hash="abcdef1234",
        file_hashes={"unet/diffusion_pytorch_model.safetensors": "a" * 64},
        device=torch.device("cpu"),
        dtype=torch.float16,
        loras=[{"name": "detail", "weight": 0.8, "hash": "123"}],
        versions={"malerei": "0.1.0", "torch": "2", "diffusers": "0.42", "transformers": "5"},
    )
    kwargs.update(over)
    return build_recipe(**kwargs)


def test_recipe_contents():
    r = _recipe()
    assert r["format"] == "malerei-recipe" and r["format_version"] == 1
    assert r["device"] == "cpu" and r["dtype"] == "float16"
    assert r["model"] == {"name": "shapes", "family": "sd1", "short_hash": "abcdef1234",
                          "file_hashes": {"unet/diffusion_pytorch_model.safetensors": "a" * 64}}
    assert r["params"]["size"] == [512, 512]  # JSON form, so it reads back equal
    assert r["loras"] == [{"name": "detail", "weight": 0.8, "hash": "123"}] and r["embeddings"] == []
    assert r["versions"]["diffusers"] == "0.42"
    assert json.loads(json.dumps(r)) == r


def test_recipe_is_pure():
    assert _recipe() == _recipe()
    assert _recipe(params={"seed": 6}) != _recipe()


def test_recipe_default_versions():
    r = _recipe(versions=None)
    assert set(r["versions"]) == {"malerei", "torch", "diffusers", "transformers"}
    assert r["versions"] == library_versions()
    assert r["versions"]["malerei"] == malerei_version() != "unknown"


def test_recipe_rejects_non_json():
    with pytest.raises(InvalidParameter, match="JSON"):
        _recipe(params={"x": object()})
    with pytest.raises(InvalidParameter, match="JSON"):
        _recipe(params={"x": float("inf")})
