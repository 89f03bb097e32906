"""jaxbench.datasets.tfds_order, step by step against the tfds code it mirrors."""

import numpy as np
import pytest

from jaxbench.datasets import tfds_order

tfds = pytest.importorskip("tensorflow_datasets")


def test_hash_order_is_tfds_md5_of_split_and_key():
    from tensorflow_datasets.core import hashing

    rng = np.random.default_rng(0)
    for split, keys in (("train", list(range(3000))),
                        ("validation", [f"val_{i}.JPEG" for i in rng.permutation(500)]),
                        ("test", [f"n{rng.integers(1e8):08d}_{i}.JPEG" for i in range(500)])):
        hasher = hashing.Hasher(split)
        expected = sorted(range(len(keys)), key=lambda i: hasher.hash_key(keys[i]))
        np.testing.assert_array_equal(tfds_order.hash_order(split, keys), expected)


def test_duplicate_keys_are_refused_as_tfds_does():
    with pytest.raises(ValueError, match="share the key 'a.JPEG'"):
        tfds_order.hash_order("train", ["a.JPEG", "b.JPEG", "a.JPEG"])


def test_shard_count_and_boundaries_equal_tfds():
    from tensorflow_datasets.core.utils import shard_utils

    mib = 1 << 20
    for total in (0, 10 * mib, 128 * mib - 1, 128 * mib, 195 * mib, 256 * mib, 700 * mib,
                  5000 * mib, 70_000 * mib, 2_000_000 * mib):
        for n in (1, 3, 1000, 100_000, 3_000_000):
            if total >= 1025 * 1024 * mib and n < 2048:
                continue  # tfds' own loop never ends for these (more than 1 TiB in a few rows)
            assert tfds_order.num_shards(total, n) == \
                shard_utils.ShardConfig.calculate_number_shards(total, n), (total, n)
    for n, k in ((100_000, 2), (400, 3), (200, 37), (7, 7), (10_000, 1)):
        bounds = shard_utils.get_shard_boundaries(n, k)
        assert np.cumsum(tfds_order.shard_lengths(n, k)).tolist() == list(bounds)


@pytest.mark.parametrize("n_parts, lengths", [(1, [50]), (2, [50_000 // 100] * 2),
                                              (3, [16, 33, 5]), (20, [20] * 20),
                                              (5, [0, 40, 7, 16, 32])])
def test_interleave_equals_tf_data(n_parts, lengths):
    """tf.data's interleave (tfds reads shards with cycle 16, block 16) on index ranges."""
    import tensorflow as tf

    starts = np.cumsum([0, *lengths])
    parts = [np.arange(a, b) for a, b in zip(starts, starts[1:])]
    ds = tf.data.Dataset.from_tensor_slices(np.arange(n_parts)).interleave(
        lambda i: tf.data.Dataset.range(tf.gather(starts, i), tf.gather(starts, i + 1)),
        cycle_length=16, block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    expected = [int(x) for x in ds.as_numpy_iterator()]
    assert tfds_order.interleave(parts).tolist() == expected


def test_example_size_equals_the_tfds_serializer():
    from tensorflow_datasets.core import example_serializer, features

    spec = features.FeaturesDict({"image": features.Image(shape=(64, 64, 3), encoding_format="jpeg"),
                                  "label": features.ClassLabel(num_classes=200),
                                  "file_name": features.Text()})
    serializer = example_serializer.ExampleSerializer(spec.get_serialized_info())
    # Lengths around the protobuf varint boundaries (127/128, 16383/16384, 2**21).
    for image_len in (0, 1, 100, 120, 121, 122, 127, 128, 16_370, 16_383, 16_384, 2_097_160):
        for label in (0, 127, 128, 199):
            for name in ("", "val_0.JPEG", "n" * 130):
                example = {"image": b"x" * image_len, "label": label, "file_name": name}
                size = len(serializer.serialize_example(example))
                assert size == tfds_order.example_size({
                    "image": ("bytes", image_len), "label": ("int64", label),
                    "file_name": ("bytes", len(name))}), (image_len, label, len(name))


def test_a_slice_beyond_the_split_is_refused():
    with pytest.raises(ValueError, match=r"slice \[:11\] incompatible with 10 examples"):
        tfds_order.split_read_order("train", list(range(10)), None, 11, shards=1)
