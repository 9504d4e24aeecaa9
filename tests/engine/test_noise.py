"""Seeds and noise: same numbers as diffusers' CPU-generator draws, per-image streams, variation."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from malerei.engine.errors import InvalidParameter
from malerei.engine.noise import RANDOM_SEED_BOUND, ImageNoise, batch_seeds, resolve_seed, slerp

SHAPE = (4, 8, 6)


def test_initial_noise_matches_diffusers_prepare_latents_draw():
    noise = ImageNoise.for_batch(1234, 1).initial(SHAPE)
    expected = randn_tensor((1, *SHAPE), generator=torch.Generator("cpu").manual_seed(1234), dtype=torch.float32)
    assert torch.equal(noise, expected)


def test_batch_rows_equal_each_seed_alone_and_streams_continue():
    batch = ImageNoise.for_batch(40, 3)
    first = batch.initial(SHAPE)
    step = batch.randn_like(first)
    for i in range(3):
        alone = ImageNoise.for_batch(40 + i, 1)
        assert torch.equal(first[i : i + 1], alone.initial(SHAPE))
        assert torch.equal(step[i : i + 1], alone.randn_like(first[i : i + 1]))
    # The stream continues after the first draw: step noise is the generator's second draw.
    g = torch.Generator().manual_seed(41)
    torch.randn((1, *SHAPE), generator=g)
    assert torch.equal(step[1:2], torch.randn((1, *SHAPE), generator=g))
    # Same numbers as diffusers' randn_tensor with a list of generators (what schedulers use).
    again = ImageNoise.for_batch(40, 3)
    again.initial(SHAPE)
    assert torch.equal(step, randn_tensor(step.shape, generator=again.scheduler_generator, dtype=step.dtype))


def test_dtype_and_device_cast_keep_the_numbers():
    half = ImageNoise.for_batch(7, 1).initial(SHAPE, dtype=torch.float16)
    full = ImageNoise.for_batch(7, 1).initial(SHAPE)
    assert half.dtype == torch.float16
    assert torch.equal(half, full.half())


def test_negative_seed_is_random_and_recorded():
    picks = {resolve_seed(-1) for _ in range(8)}
    assert len(picks) > 1
    assert all(0 <= p < RANDOM_SEED_BOUND for p in picks)
    assert resolve_seed(5) == 5
    assert batch_seeds(5, 3) == [5, 6, 7]


@pytest.mark.parametrize("bad", [1.5, "3", True, 2**63])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(InvalidParameter):
        resolve_seed(bad)


def test_variation_strength_ends_and_middle():
    base = ImageNoise.for_batch(10, 2).initial(SHAPE)
    sub = ImageNoise.for_batch(99, 2).initial(SHAPE)
    at0 = ImageNoise.for_batch(10, 2, subseed=99, subseed_strength=0.0).initial(SHAPE)
    at1 = ImageNoise.for_batch(10, 2, subseed=99, subseed_strength=1.0).initial(SHAPE)
    mid = ImageNoise.for_batch(10, 2, subseed=99, subseed_strength=0.3).initial(SHAPE)
    assert torch.equal(at0, base)
    torch.testing.assert_close(at1, sub, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mid, base) and not torch.allclose(mid, sub)
    # Each image blends with its own variation seed (subseed + i), like A1111.
    single = ImageNoise.for_batch(11, 1, subseed=100, subseed_strength=0.3).initial(SHAPE)
    assert torch.equal(mid[1:2], single)


def test_variation_keeps_the_image_stream():
    plain = ImageNoise.for_batch(3, 1)
    varied = ImageNoise.for_batch(3, 1, subseed=8, subseed_strength=0.5)
    x = plain.initial(SHAPE)
    varied.initial(SHAPE)
    assert torch.equal(plain.randn_like(x), varied.randn_like(x))


def test_slerp_walks_the_great_circle_along_dim_1():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(SHAPE, generator=g)
    high = torch.randn(SHAPE, generator=g)
    low = low / low.norm(dim=1, keepdim=True)
    high = high / high.norm(dim=1, keepdim=True)
    out = slerp(0.25, low, high)
    # Unit columns stay unit columns, and the angle from `low` is a quarter of the whole angle.
    torch.testing.assert_close(out.norm(dim=1), torch.ones(SHAPE[0], SHAPE[2]), atol=1e-5, rtol=0)
    whole = torch.acos((low * high).sum(1))
    part = torch.acos(((low * out).sum(1)).clamp(-1, 1))
    torch.testing.assert_close(part, 0.25 * whole, atol=1e-3, rtol=0)


def test_parallel_inputs_fall_back_to_lerp():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(slerp(0.4, x, 2 * x), 1.4 * x)


def test_noise_parameters_are_checked():
    with pytest.raises(InvalidParameter):
        ImageNoise(seeds=[1], subseeds=[2], subseed_strength=1.5)
    with pytest.raises(InvalidParameter):
        ImageNoise(seeds=[1, 2], subseeds=[2], subseed_strength=0.5)
    with pytest.raises(InvalidParameter):
        ImageNoise(seeds=[])
