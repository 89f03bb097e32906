"""The tfds path: the built-in fashion_mnist builder, offline from manual_dir."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxbench import config, data
from conftest import FMNIST_FILES


def test_real_files_prepare_offline_and_load(fmnist_tfds_dir):
    cfg = config.load("fmnist_baseline")
    train, test = data.load(cfg, str(fmnist_tfds_dir))
    assert train.images.shape == (60_000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    mean, std = data.channel_stats(train.images)
    np.testing.assert_allclose([mean[0], std[0]], [0.2860, 0.3530], atol=1e-3)  # known FMNIST stats


def test_limits_take_the_first_examples(fmnist_tfds_dir):
    cfg = config.load("fmnist_baseline").replace(train_limit=100, eval_limit=30)
    train, test = data.load(cfg, str(fmnist_tfds_dir))
    full, _ = data.load(config.load("fmnist_baseline").replace(train_limit=200, eval_limit=1),
                        str(fmnist_tfds_dir))
    assert len(train) == 100 and len(test) == 30
    np.testing.assert_array_equal(train.labels, full.labels[:100])


def test_a_damaged_file_fails_the_checksum(tmp_path):
    if not FMNIST_FILES.is_dir():
        pytest.skip("real Fashion-MNIST files not found")
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in data.MANUAL_FILES["fashion_mnist"]:
        content = (FMNIST_FILES / name).read_bytes()
        (manual / name).write_bytes(content[:1000] if name.startswith("t10k-labels") else content)
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz.*wrong checksum"):
        data.prepare("fashion_mnist", str(tmp_path / "tfds"), str(manual))
    assert not tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_tfds_path_with_mock_data(tmp_path, mock_manual_dir):
    """Without the real files: tfds' own mock supplies examples through the same code path."""
    manual = mock_manual_dir
    cfg = config.load("fmnist_baseline")
    with tfds.testing.mock_data(num_examples=96):
        train, test = data.load(cfg, str(tmp_path / "tfds"), str(manual))
    assert train.images.shape == (96, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and set(train.labels) <= set(range(10))
    assert len(test) == 96


def test_missing_data_names_the_files_and_the_flag(tmp_path):
    with pytest.raises(data.DataError, match="--manual-dir") as err:
        data.prepare("fashion_mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(data.DataError, match="lacks train-labels-idx1-ubyte.gz, t10k"):
        data.prepare("fashion_mnist", str(tmp_path), str(tmp_path / "m"))
