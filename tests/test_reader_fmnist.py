"""The TensorFlow-free Fashion-MNIST reader: exactly the tfds path's arrays, labels and order."""

import shutil
import sys

import numpy as np
import pytest

from jaxbench import config, data
from jaxbench.datasets import files
from conftest import FMNIST_FILES


def no_tfds(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def real_files():
    if not (FMNIST_FILES / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST files not found in {FMNIST_FILES}")
    return FMNIST_FILES


def test_reader_equals_the_tfds_path_exactly(fmnist_tfds_dir, monkeypatch):
    cfg = config.load("fmnist_baseline")
    for limits in ((None, None), (1000, 300)):
        c = cfg.replace(train_limit=limits[0], eval_limit=limits[1])
        tf_train, tf_test = data.load(c, str(fmnist_tfds_dir))
        f_train, f_test = data.load(c, str(fmnist_tfds_dir), str(FMNIST_FILES), reader="files")
        for a, b in ((tf_train, f_train), (tf_test, f_test)):
            assert b.images.dtype == np.uint8 and b.labels.dtype == np.int32
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.labels, b.labels)
    # tfds' order is not the file order: it is md5(split + index) order.
    _, _, idx = files.read("fashion_mnist", FMNIST_FILES, [("train", 5)], names=True)[0]
    assert idx.tolist() != [0, 1, 2, 3, 4]


def test_without_tensorflow_load_uses_the_reader(tmp_path, monkeypatch):
    manual = real_files()
    no_tfds(monkeypatch)
    train, test = data.load(config.load("fmnist_baseline"), str(tmp_path), str(manual))
    assert train.images.shape == (60_000, 28, 28, 1) and test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert not list(tmp_path.iterdir())  # Fashion-MNIST is read directly: nothing cached


def test_the_sha256_values_are_the_ones_tfds_registers():
    tfds = pytest.importorskip("tensorflow_datasets")
    registered = {info.filename: info.checksum
                  for info in tfds.builder_cls("fashion_mnist").url_infos.values()}
    assert registered == files.FMNIST_SHA256
    assert all(url.startswith(files.FMNIST_URL)
               for url in tfds.builder_cls("fashion_mnist").url_infos)
    if (FMNIST_FILES / "SHA256SUMS").is_file():  # and the shared copy's own list agrees
        sums = dict(reversed(line.split()) for line in
                    (FMNIST_FILES / "SHA256SUMS").read_text().splitlines() if line.strip())
        assert {k: sums[k] for k in files.FMNIST_SHA256} == files.FMNIST_SHA256


def test_a_damaged_file_is_named(tmp_path, monkeypatch):
    source = real_files()
    no_tfds(monkeypatch)
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in files.FMNIST_SHA256:
        shutil.copy(source / name, manual / name)
    content = bytearray((manual / "train-labels-idx1-ubyte.gz").read_bytes())
    content[-100] ^= 0x01
    (manual / "train-labels-idx1-ubyte.gz").write_bytes(bytes(content))
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte\.gz: wrong checksum \(sha256"):
        data.load(config.load("fmnist_baseline"), str(tmp_path), str(manual))


def test_missing_files_and_no_manual_dir_name_the_flag(tmp_path, monkeypatch):
    no_tfds(monkeypatch)
    cfg = config.load("fmnist_baseline")
    with pytest.raises(data.DataError, match="no --manual-dir was given.*t10k-images-idx3-ubyte.gz"):
        data.load(cfg, str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(data.DataError, match="lacks train-labels-idx1-ubyte.gz, t10k"):
        data.load(cfg, str(tmp_path), str(tmp_path / "m"))
    with pytest.raises(data.DataError, match="not a folder"):
        data.load(cfg, str(tmp_path), str(tmp_path / "absent"))
