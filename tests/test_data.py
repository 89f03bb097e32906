import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import data


def test_preprocess_resizes_normalizes_and_replicates():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    out = np.asarray(data.preprocess(jnp.asarray(images), mean, std, 64))
    assert out.shape == (64, 64, 64, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # the channel is replicated
    # Bilinear upsampling keeps the mean and shrinks the spread a little (it interpolates).
    assert abs(out.mean()) < 0.02
    assert 0.6 < out.std() < 1.0


def test_preprocess_keeps_rgb_at_64_and_normalizes_per_channel():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    images[..., 1] //= 2  # a channel with other statistics
    mean, std = data.channel_stats(images)
    out = np.asarray(data.preprocess(jnp.asarray(images), mean, std, 64))
    assert out.shape == (32, 64, 64, 3)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-4)


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images, chunk=7)
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-5)


def test_epoch_order_is_seeded_shuffled_and_drops_the_partial_batch():
    a = data.epoch_order(seed=0, epoch=1, n=100, batch_size=32)
    assert a.shape == (3, 32) and len(set(a.ravel())) == 96
    np.testing.assert_array_equal(a, data.epoch_order(0, 1, 100, 32))
    assert not np.array_equal(a, data.epoch_order(0, 2, 100, 32))
    assert not np.array_equal(a, data.epoch_order(1, 1, 100, 32))
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.epoch_order(0, 1, 10, 32)


def test_eval_order_covers_every_example_once():
    idx, mask = data.eval_order(n=70, batch_size=32)
    assert idx.shape == mask.shape == (3, 32)
    assert sorted(idx[mask].tolist()) == list(range(70))
    assert mask.sum() == 70 and not mask[-1, 6:].any()
