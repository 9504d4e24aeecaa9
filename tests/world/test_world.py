"""The shapes world follows ../shared/SHAPES.md: vocabulary, captions, rendering, reading back."""

import re

import numpy as np
import pytest

from malerei.world.eval_set import eval_cases
from malerei.world.read import judge, nearest_colour, read_image
from malerei.world.render import render
from malerei.world.scene import TWO_OBJECT_CELL_PAIRS, Scene, WorldObject, caption_of, sample_scene
from malerei.world.shards import ShardSpec, read_shards, render_shard, write_shards
from malerei.world.vocab import HELD_OUT, PALETTE, POSITIONS

POSITION_RE = "|".join(re.escape(p) for p in POSITIONS)
OBJECT_RE = rf"a (small|large) ({'|'.join(PALETTE)}) (circle|square|triangle) ({POSITION_RE})"
ONE_RE = re.compile(rf"^{OBJECT_RE} on a ({'|'.join(PALETTE)}) background$")
TWO_RE = re.compile(rf"^{OBJECT_RE} and {OBJECT_RE} on a ({'|'.join(PALETTE)}) background$")


def obj(shape="circle", colour="red", size="large", cell=(1, 1), extent=20.0):
    centres = (14.0, 32.0, 50.0)
    return WorldObject(shape=shape, colour=colour, size=size, cell=cell, cx=centres[cell[0]], cy=centres[cell[1]], extent=extent)


def test_caption_grammar_one_and_two_objects():
    rng = np.random.default_rng(1)
    for _ in range(300):
        assert ONE_RE.match(sample_scene(rng, n_objects=1).caption)
        assert TWO_RE.match(sample_scene(rng, n_objects=2).caption)


def test_literal_caption():
    scene = Scene(background="blue", objects=(obj(cell=(0, 0), colour="red", size="small", extent=10),))
    assert scene.caption == "a small red circle in the top left on a blue background"


def test_dropped_phrase_variants():
    o = obj(cell=(1, 1))
    assert caption_of(Scene(background="blue", objects=(o,), drop=frozenset({"size", "background"}))) == "a red circle in the center"
    assert caption_of(Scene(background="blue", objects=(o,), drop=frozenset({"position"}))) == "a large red circle on a blue background"


def test_training_split_never_contains_held_out_pairs():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        scene = sample_scene(rng, n_objects=1 + int(rng.integers(2)), split="train", drop_probability=0.3)
        for o in scene.objects:
            assert (o.colour, o.shape) not in HELD_OUT
            assert o.colour != scene.background


def test_two_objects_never_neighbours():
    for a, b in TWO_OBJECT_CELL_PAIRS:
        assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2
    rng = np.random.default_rng(3)
    for _ in range(500):
        a, b = sample_scene(rng, n_objects=2).objects
        assert max(abs(a.cell[0] - b.cell[0]), abs(a.cell[1] - b.cell[1])) >= 2


def test_render_is_deterministic_and_anti_aliased():
    scene = sample_scene(np.random.default_rng(4), n_objects=1)
    a, b = render(scene), render(scene)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert len(colours) > 2, "edges should carry blended (anti-aliased) colours"


@pytest.mark.parametrize("size", [64, 128, 256])
def test_scaled_canvas_reads_the_same(size):
    scene = Scene(background="green", objects=(obj(shape="square", colour="yellow", cell=(2, 0)),))
    assert judge(scene, render(scene, size)).adheres


def test_shapes_read_back_by_fill_ratio():
    for shape in ("circle", "square", "triangle"):
        scene = Scene(background="black", objects=(obj(shape=shape, colour="orange"),))
        reading = read_image(render(scene))
        assert reading.objects[0].shape == shape
        assert reading.background == "black"


def test_reader_scores_renders_at_least_95_percent():
    cases = eval_cases()
    ok = [judge(c.scene, render(c.scene)).adheres for c in cases]
    assert np.mean(ok) >= 0.95


def test_reader_detects_wrong_attributes():
    scene = Scene(background="white", objects=(obj(shape="square", colour="blue", cell=(0, 2)),))
    wrong = Scene(background="white", objects=(obj(shape="square", colour="red", cell=(0, 2)),))
    j = judge(wrong, render(scene))
    assert not j.adheres and j.attributes["colour"] is False and j.attributes["shape"] is True


def test_two_object_binding_is_judged_per_cell():
    a, b = obj(shape="circle", colour="red", cell=(0, 0)), obj(shape="square", colour="blue", cell=(2, 2))
    scene = Scene(background="white", objects=(a, b))
    assert judge(scene, render(scene)).adheres
    swapped = Scene(background="white", objects=(obj(shape="circle", colour="blue", cell=(0, 0)), obj(shape="square", colour="red", cell=(2, 2))))
    assert not judge(swapped, render(scene)).adheres


def test_blank_image_fails_and_nearest_colour():
    scene = Scene(background="white", objects=(obj(),))
    blank = np.full((64, 64, 3), PALETTE["white"], dtype=np.uint8)
    assert not judge(scene, blank).adheres
    assert nearest_colour((230, 50, 45)) == "red"


def test_eval_set_is_fixed_and_sized():
    cases = eval_cases()
    groups = [c.group for c in cases]
    assert groups.count("seen") + groups.count("heldout") >= 300 and groups.count("heldout") >= 60
    assert groups.count("two") >= 100
    assert [c.caption for c in cases] == [c.caption for c in eval_cases()]
    for c in cases:
        pairs = {(o.colour, o.shape) for o in c.scene.objects}
        assert (c.group == "heldout") == bool(pairs & HELD_OUT)


def test_shards_round_trip(tmp_path):
    spec = ShardSpec(size=64)
    paths = write_shards(tmp_path, n=25, seed=7, shard_size=10, spec=spec)
    assert len(paths) == 3
    images, captions = read_shards(tmp_path)
    assert images.shape == (25, 64, 64, 3) and len(captions) == 25
    again, again_captions = render_shard(0, 10, 7, spec)
    assert np.array_equal(images[:10], again) and captions[:10] == again_captions


def test_shard_scenes_are_re_derived_from_meta_and_checked(tmp_path):
    """read_shard_scenes gives the scenes behind a shard directory's images (same captions), and
    refuses a directory whose meta.json no longer matches what was rendered."""
    import json

    from malerei.world.render import render
    from malerei.world.shards import read_shard_scenes, read_shards, write_shards

    write_shards(tmp_path, n=10, seed=5, shard_size=6)
    images, captions = read_shards(tmp_path)
    scenes = read_shard_scenes(tmp_path, 10)
    assert [s.caption for s in scenes] == captions
    assert all((render(s, 64) == image).all() for s, image in zip(scenes, images))
    assert len(read_shard_scenes(tmp_path, 4)) == 4
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "seed": 6}))
    with pytest.raises(ValueError, match="does not match"):
        read_shard_scenes(tmp_path, 10)
