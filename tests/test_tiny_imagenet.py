"""Our tiny_imagenet tfds builder, on generated fixtures in the official layout (zip, folder, tar.gz)."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxbench import config, data, run
from jaxbench.datasets.tiny_imagenet import tiny_imagenet_dataset_builder as tin
import tiny_fixture as fx
from conftest import TINY_FILES


def prepare(tmp_path, manual):
    return data.prepare("tiny_imagenet", str(tmp_path / "tfds"), str(manual))


def official(monkeypatch, zip_path):
    """Treat this fixture zip as 'the official one' so verify_zip's real check runs on it."""
    digest = hashlib.md5(zip_path.read_bytes()).hexdigest()
    monkeypatch.setitem(tin.OFFICIAL_ZIP, "size", zip_path.stat().st_size)
    monkeypatch.setitem(tin.OFFICIAL_ZIP, "md5", digest)


def check_prepared(b):
    assert b.info.splits["train"].num_examples == 2 * 200
    assert b.info.splits["validation"].num_examples == 200
    train = data.load_split(b, "train")
    val = data.load_split(b, "validation")
    assert train.images.shape == (400, 64, 64, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.labels, minlength=200).tolist() == [2] * 200
    # The label of a given validation image equals its annotation.
    rows = {r["file_name"].decode(): r for r in tfds.as_numpy(b.as_dataset(split="validation"))}
    annotated = dict(line.split("\t")[:2] for line in
                     fx.files()["val/val_annotations.txt"].decode().splitlines())
    for name in ("val_0.JPEG", "val_1.JPEG", "val_123.JPEG"):
        assert b.info.features["label"].int2str(rows[name]["label"]) == annotated[name]
    # The grayscale JPEG comes out as RGB with equal channels.
    gray = next(r for r in tfds.as_numpy(b.as_dataset(split="train"))
                if r["file_name"].decode() == fx.GRAY_TRAIN.rsplit("/", 1)[1])
    assert gray["image"].shape == (64, 64, 3)
    assert (gray["image"][..., 0] == gray["image"][..., 1]).all()
    assert b.info.metadata["class_names"][0] == "Egyptian cat"
    return train, val


def test_folder_form(tmp_path):
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    check_prepared(prepare(tmp_path, manual))


def test_folder_given_directly(tmp_path):
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    b = prepare(tmp_path, manual / tin.ROOT)
    assert b.info.splits["validation"].num_examples == 200


def test_zip_form_verified_against_its_checksum(tmp_path, monkeypatch):
    zip_path = fx.write_zip(tmp_path / "manual", fx.files())
    official(monkeypatch, zip_path)
    check_prepared(prepare(tmp_path, zip_path.parent))


def test_tar_form(tmp_path):
    manual = fx.write_tars(tmp_path / "manual", fx.files())
    b = prepare(tmp_path, manual)
    assert b.info.splits["train"].num_examples == 400


def test_experiment_loads_with_the_paper_preprocessing_contract(tmp_path):
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    cfg = config.load("tiny_target")
    assert (cfg.num_classes, cfg.eval_split, cfg.optimizer, cfg.schedule) == (
        200, "validation", "sgd", "cosine")
    train, val = data.load(cfg, str(tmp_path / "tfds"), str(manual))
    assert len(train) == 400 and len(val) == 200
    mean, std = data.channel_stats(train.images)
    assert mean.shape == std.shape == (3,)


@pytest.mark.parametrize("kind, message", fx.BROKEN.items())
def test_a_partial_tree_stops_preparation_and_leaves_nothing_trusted(tmp_path, kind, message):
    manual = fx.write_folder(tmp_path / "manual", fx.broken(kind))
    with pytest.raises(data.DataError, match=message.replace(".", r"\.")):
        prepare(tmp_path, manual)
    assert not tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_zip_slip_is_refused(tmp_path, monkeypatch):
    zip_path = fx.write_zip(tmp_path / "manual", fx.files(), extra={
        f"{tin.ROOT}/../../evil.txt": b"x"})
    official(monkeypatch, zip_path)
    with pytest.raises(data.DataError, match=r"evil\.txt' has a path escaping its folder"):
        prepare(tmp_path, zip_path.parent)
    assert not (tmp_path / "evil.txt").exists()


def test_a_damaged_zip_fails_its_md5(tmp_path, monkeypatch):
    zip_path = fx.write_zip(tmp_path / "manual", fx.files())
    official(monkeypatch, zip_path)
    content = bytearray(zip_path.read_bytes())
    content[100] ^= 0xFF
    zip_path.write_bytes(bytes(content))
    with pytest.raises(data.DataError, match="md5 .* differs from the official"):
        prepare(tmp_path, zip_path.parent)


def test_real_zip_size_is_checked(tmp_path):
    zip_path = fx.write_zip(tmp_path / "manual", fx.files())  # not the official 248 MB file
    with pytest.raises(data.DataError, match="the official zip has 248,100,043"):
        prepare(tmp_path, zip_path.parent)


def test_empty_manual_dir_names_what_it_expects(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(data.DataError, match="holds no Tiny ImageNet: expected tiny-imagenet-200.zip"):
        prepare(tmp_path, tmp_path / "manual")


def test_cli_exit_2_on_a_broken_tree(tmp_path, capsys):
    manual = fx.write_folder(tmp_path / "manual", fx.broken("no annotations"))
    code = run.main(["--exp", "tiny_baseline", "--data-dir", str(tmp_path / "tfds"),
                     "--manual-dir", str(manual), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "val_annotations.txt is missing" in capsys.readouterr().err


def test_the_official_zip_is_registered_for_download():
    info = tin.Builder.url_infos[tin.URL]
    assert int(info.size) == tin.OFFICIAL_ZIP["size"] == 248_100_043
    assert info.checksum == "6198c8ae015e2b3e007c7841da39ec069199b9aa3bfa943a462022fe5e43c821"
    assert info.filename == "tiny-imagenet-200.zip"


def test_online_a_download_that_is_not_the_official_zip_is_refused(tmp_path, monkeypatch):
    """No --manual-dir: tfds downloads the registered URL and checks its sha256 (served here: a
    fixture zip, which must fail that check)."""
    from test_tfds_fmnist import serve

    zip_path = fx.write_zip(tmp_path / "served", fx.files())
    serve(monkeypatch, {tin.URL: zip_path.read_bytes()})
    with pytest.raises(data.DataError, match="does not match its registered checksum"):
        data.prepare("tiny_imagenet", str(tmp_path / "tfds"))
    assert not tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_offline_tiny_imagenet_names_the_manual_dir(tmp_path, monkeypatch):
    from test_tfds_fmnist import serve

    serve(monkeypatch, {})
    with pytest.raises(data.DataError, match="could not be downloaded.*--manual-dir DIR"):
        data.prepare("tiny_imagenet", str(tmp_path / "tfds"))


@pytest.mark.slow
def test_real_dataset_prepares_with_500_and_50_per_class(tmp_path):
    if not (TINY_FILES / tin.TAR_NAMES[0]).is_file():
        pytest.skip(f"real Tiny ImageNet archives not found in {TINY_FILES}")
    b = prepare(tmp_path, TINY_FILES)
    train = data.load_split(b, "train")
    val = data.load_split(b, "validation")
    assert np.bincount(train.labels, minlength=200).tolist() == [500] * 200
    assert np.bincount(val.labels, minlength=200).tolist() == [50] * 200
    assert train.images.shape == (100_000, 64, 64, 3)
