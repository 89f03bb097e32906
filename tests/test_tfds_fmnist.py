"""The tfds path: the built-in fashion_mnist builder, offline from manual_dir, or downloaded."""

import contextlib
import socket
import time

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from jaxbench import config, data
from conftest import FMNIST_FILES


def serve(monkeypatch, table: dict[str, bytes]):
    """Stand in for the network under tfds' downloader: `table` maps URL -> body; any other URL
    fails as an unreachable host does (requests' ConnectionError). The host probe passes."""
    @contextlib.contextmanager
    def open_url(url, **kwargs):
        if url not in table:
            raise requests.exceptions.ConnectionError(
                f"HTTPConnectionPool: Max retries exceeded with url: {url} (NameResolutionError)")

        class Response:
            headers = {"Content-length": str(len(table[url]))}

        Response.url = url
        yield Response(), iter([table[url]])

    monkeypatch.setattr(downloader, "_open_url", open_url)
    monkeypatch.setattr(data, "_unreachable", lambda hosts, timeout=5.0: None)
    monkeypatch.delenv("JAXBENCH_OFFLINE", raising=False)


def registered_urls():
    return {info.filename: url
            for url, info in tfds.builder_cls("fashion_mnist").url_infos.items()}


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


def test_missing_data_names_the_files_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBENCH_OFFLINE", "1")  # no download attempt, even with a network
    with pytest.raises(data.DataError, match="--manual-dir") as err:
        data.prepare("fashion_mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train-images-idx3-ubyte.gz").touch()
    with pytest.raises(data.DataError, match="lacks train-labels-idx1-ubyte.gz, t10k"):
        data.prepare("fashion_mnist", str(tmp_path), str(tmp_path / "m"))
    # Already prepared: a --manual-dir typo is still an error, which says the flag can go.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    assert data.prepare("fashion_mnist", str(tmp_path)).name == "fashion_mnist"
    with pytest.raises(data.DataError, match="--manual-dir .*typo: not a folder.* already "
                                             "prepared .* drop --manual-dir"):
        data.prepare("fashion_mnist", str(tmp_path), str(tmp_path / "typo"))


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "file").touch()
    for reader in ("tfds", "files"):
        with pytest.raises(data.DataError, match=r"--data-dir .*file/tfds: .*file is a file, not a folder"):
            data.load(config.load("fmnist_baseline"), str(tmp_path / "file" / "tfds"),
                      str(tmp_path), reader=reader)


@pytest.mark.slow
def test_online_without_manual_dir_tfds_downloads_and_verifies(tmp_path, monkeypatch):
    """No --manual-dir, dataset not prepared: tfds fetches its registered URLs (served here from
    the real files) and checks their sha256 before preparing.

    Slow (tfds prepares all 70,000 real images, ~30 s): the default run keeps the checksum
    refusal and the offline errors below."""
    if not FMNIST_FILES.is_dir():
        pytest.skip("real Fashion-MNIST files not found")
    serve(monkeypatch, {url: (FMNIST_FILES / name).read_bytes()
                        for name, url in registered_urls().items()})
    cfg = config.load("fmnist_baseline").replace(train_limit=500, eval_limit=100)
    train, test = data.load(cfg, str(tmp_path / "tfds"))
    assert len(train) == 500 and len(test) == 100
    assert tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_a_download_that_fails_its_checksum_prepares_nothing(tmp_path, monkeypatch):
    urls = registered_urls()
    serve(monkeypatch, {url: b"an HTML error page, not the dataset" for url in urls.values()})
    with pytest.raises(data.DataError, match="does not match its registered checksum"):
        data.prepare("fashion_mnist", str(tmp_path / "tfds"))
    assert not tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_offline_a_failed_download_names_the_manual_dir(tmp_path, monkeypatch):
    serve(monkeypatch, {})  # every download raises a connection error
    start = time.monotonic()
    with pytest.raises(data.DataError, match="it could not be downloaded") as err:
        data.prepare("fashion_mnist", str(tmp_path / "tfds"))
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert "--manual-dir DIR" in message and "t10k-images-idx3-ubyte.gz" in message
    assert "ConnectionError" in message and "\n" not in message
    assert not tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_unreachable_hosts_fail_in_seconds_not_minutes(tmp_path, monkeypatch):
    """tfds itself retries a dead host for minutes; a quick probe answers first."""
    monkeypatch.delenv("JAXBENCH_OFFLINE", raising=False)

    def no_network(address, timeout=None):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(data.DataError, match="cannot reach fashion-mnist.s3-website"
                                             r".*Name or service not known.*--manual-dir DIR"):
        data.prepare("fashion_mnist", str(tmp_path / "tfds"))
