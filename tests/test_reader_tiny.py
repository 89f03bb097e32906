"""The TensorFlow-free Tiny ImageNet reader against the tfds path, on the fixture (and real data).

What "the same" means here, and what is asserted:
* same files and same order: the reader's example keys (file names) equal tfds' `file_name`
  sequence exactly, for the full splits and for `split[:limit]`, with tfds' real shard layout
  (one shard for the fixture, two for the real train split) and with shards forced (3, 20);
* same labels: exactly;
* pixels: exactly equal to the JPEG/PNG bytes tfds stored, decoded with TensorFlow's accurate
  integer IDCT (`dct_method="INTEGER_ACCURATE"`, the IDCT PIL uses), and within decoder
  tolerance of what the tfds path yields, which decodes with TensorFlow's default fast integer
  IDCT ("INTEGER_FAST"). Measured on the fixture (600 random-noise JPEGs at quality 95, the worst
  case for the fast IDCT): max |diff| 10, mean 1.50; on the real data: max 5, mean < 1.
  Grayscale images (stored as PNG) are equal exactly.
"""

import sys

import numpy as np
import pytest

from jaxbench import config, data, run
from jaxbench.datasets import files
from jaxbench.datasets.tiny_imagenet import source as tin
import tiny_fixture as fx
from conftest import TINY_FILES

FIXTURE_MAX_DIFF = 12  # measured 10 (see the module docstring)
FIXTURE_MEAN_DIFF = 2.0  # measured 1.50
REAL_MAX_DIFF = 8  # measured 5 on a sample of the real validation images
REAL_MEAN_DIFF = 1.2


def no_tfds(monkeypatch):
    """Make `import tensorflow_datasets` fail, as on the GPU image."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def manual_dir(tmp_path, form, monkeypatch):
    content = fx.files()
    if form == "folder":
        return fx.write_folder(tmp_path / "manual", content)
    if form == "tar":
        return fx.write_tars(tmp_path / "manual", content)
    zip_path = fx.write_zip(tmp_path / "manual", content)
    import hashlib  # treat this fixture zip as "the official one" so verify_zip's check runs

    monkeypatch.setitem(tin.OFFICIAL_ZIP, "size", zip_path.stat().st_size)
    monkeypatch.setitem(tin.OFFICIAL_ZIP, "md5", hashlib.md5(zip_path.read_bytes()).hexdigest())
    return zip_path.parent


def tfds_rows(b, split, limit=None):
    """(file names, labels, stored image bytes) in the order tfds' path reads them."""
    import tensorflow_datasets as tfds
    from jaxbench.datasets import tfds_order

    spec = split if limit is None else f"{split}[:{limit}]"
    ds = b.as_dataset(split=spec, shuffle_files=False,
                      decoders={"image": tfds.decode.SkipDecoding()},
                      read_config=tfds.ReadConfig(try_autocache=False,
                                                  interleave_cycle_length=tfds_order.CYCLE_LENGTH,
                                                  interleave_block_length=tfds_order.BLOCK_LENGTH))
    rows = list(tfds.as_numpy(ds))
    return ([r["file_name"].decode() for r in rows], np.array([r["label"] for r in rows]),
            [r["image"] for r in rows])


def accurate_decode(stored: list[bytes]) -> np.ndarray:
    import tensorflow as tf

    out = []
    for blob in stored:
        if blob[:2] == b"\xff\xd8":
            out.append(tf.io.decode_jpeg(blob, channels=3, dct_method="INTEGER_ACCURATE").numpy())
        else:
            out.append(tf.io.decode_png(blob, channels=3).numpy())
    return np.stack(out)


def assert_same(b, reader_rows, split, limit, max_diff, mean_diff):
    """The reader's (images, labels, names) against tfds' prepared split `b`."""
    images, labels, names = reader_rows
    tf_names, tf_labels, stored = tfds_rows(b, split, limit)
    assert list(names) == tf_names  # same files, same order
    np.testing.assert_array_equal(labels, tf_labels)  # same labels
    np.testing.assert_array_equal(images, accurate_decode(stored))  # same bytes, same pixels
    tf_images = data.load_split(b, split, limit).images  # what the tfds path gives
    diff = np.empty(images.shape, np.uint8)  # |difference|, chunk by chunk (real data: 1.2 GB)
    for start in range(0, len(images), 8192):
        a, t = images[start:start + 8192], tf_images[start:start + 8192]
        diff[start:start + 8192] = np.maximum(a, t) - np.minimum(a, t)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())
    return diff


@pytest.mark.parametrize("form, shards", [("folder", None), ("tar", 3), ("zip", 20)])
def test_reader_equals_the_tfds_path_on_the_fixture(tmp_path, monkeypatch, form, shards):
    import tensorflow_datasets as tfds

    data._tfds()  # registers tiny_imagenet
    manual = manual_dir(tmp_path, form, monkeypatch)
    b = tfds.builder("tiny_imagenet", data_dir=str(tmp_path / "tfds"))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), num_shards=shards))
    if shards:
        assert len(b.info.splits["train"].shard_lengths) == shards
    requests = [("train", None), ("validation", None), ("train", 150), ("validation", 37)]
    rows = files.read("tiny_imagenet", manual, requests, tmp_path / "cache", shards, names=True)
    diffs = [assert_same(b, r, split, limit, FIXTURE_MAX_DIFF, FIXTURE_MEAN_DIFF)
             for r, (split, limit) in zip(rows, requests)]
    assert diffs[0].max() > 0  # the tolerance is needed: the two IDCTs do differ
    gray = list(rows[0][2]).index(fx.GRAY_TRAIN.rsplit("/", 1)[1])
    assert diffs[0][gray].max() == 0  # grayscale (stored as PNG): identical


def test_data_load_without_tensorflow_equals_with(tmp_path, monkeypatch, capsys):
    manual = fx.write_tars(tmp_path / "manual", fx.files())
    cfg = config.load("tiny_target").replace(train_limit=300)
    train, val = data.load(cfg, str(tmp_path / "tfds"), str(manual))  # tfds is installed here
    no_tfds(monkeypatch)
    assert not data.have_tfds()
    capsys.readouterr()
    f_train, f_val = data.load(cfg, str(tmp_path / "tfds"), str(manual))  # the reader
    err = capsys.readouterr().err
    assert "decoding with PIL" in err and "cached the decoded arrays" in err
    for a, b in ((train, f_train), (val, f_val)):
        assert a.images.shape == b.images.shape and b.images.dtype == np.uint8
        assert b.labels.dtype == np.int32
        np.testing.assert_array_equal(a.labels, b.labels)
        assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= FIXTURE_MAX_DIFF
    assert len(f_train) == 300 and len(f_val) == 200
    again, _ = data.load(cfg, str(tmp_path / "tfds"), str(manual))  # second run: the cache
    assert "read the decoded arrays from" in capsys.readouterr().err
    np.testing.assert_array_equal(again.images, f_train.images)


def cached(tmp_path, manual):
    return files.read("tiny_imagenet", manual, [("train", None), ("validation", None)],
                      tmp_path / "cache")


def test_the_cache_is_keyed_by_the_source_files(tmp_path, capsys):
    manual = fx.write_tars(tmp_path / "manual", fx.files())
    first = cached(tmp_path, manual)
    assert len(list((tmp_path / "cache").glob("tiny_imagenet-*.npz"))) == 1
    capsys.readouterr()
    cached(tmp_path, manual)
    assert "read the decoded arrays" in capsys.readouterr().err
    fx.write_tars(manual, fx.files(seed=1))  # other content (new size, new mtime): a new cache
    other = cached(tmp_path, manual)
    assert "decoding with PIL" in capsys.readouterr().err
    assert len(list((tmp_path / "cache").glob("tiny_imagenet-*.npz"))) == 2
    assert not np.array_equal(first[0][0], other[0][0])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pixel", "stale key"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, capsys, damage):
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    good = cached(tmp_path, manual)
    (path,) = (tmp_path / "cache").glob("tiny_imagenet-*.npz")
    content = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    else:  # a well-formed file whose content disagrees with its own metadata
        with np.load(path) as z:
            members = {k: z[k] for k in z.files}
        if damage == "pixel":
            members["train_images"][3, 10, 10, 0] ^= 0xFF
        else:
            members["meta"] = np.asarray(str(members["meta"]).replace('"reader_version": 1',
                                                                      '"reader_version": 0'))
        with open(path, "wb") as f:
            np.savez(f, **members)
    with pytest.warns(files.CacheWarning, match="ignoring the decoded-array cache"):
        again = cached(tmp_path, manual)
    for (a, la), (b, lb) in zip(good, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert "cached the decoded arrays" in capsys.readouterr().err  # rewritten
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(good, cached(tmp_path, manual)))


def test_an_unwritable_cache_only_warns(tmp_path):
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(files.CacheWarning, match="could not write"):
        (train, _), (val, _) = cached(tmp_path, manual)
    assert len(train) == 400 and len(val) == 200


@pytest.mark.parametrize("kind, message", fx.BROKEN.items())
def test_bad_sources_fail_with_the_builders_messages(tmp_path, monkeypatch, kind, message):
    no_tfds(monkeypatch)
    manual = fx.write_folder(tmp_path / "manual", fx.broken(kind))
    with pytest.raises(data.DataError, match=message.replace(".", r"\.")):
        data.load(config.load("tiny_baseline"), str(tmp_path / "d"), str(manual))
    assert not list((tmp_path / "d").rglob("*.npz"))  # nothing cached from a bad source


def test_without_tensorflow_the_manual_dir_is_required(tmp_path, monkeypatch):
    no_tfds(monkeypatch)
    cfg = config.load("tiny_baseline")
    with pytest.raises(data.DataError, match="tensorflow-datasets is not installed.*--manual-dir DIR"):
        data.load(cfg, str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="holds no Tiny ImageNet: expected tiny-imagenet-200.zip"):
        data.load(cfg, str(tmp_path), str(tmp_path / "empty"))
    manual = fx.write_folder(tmp_path / "manual", fx.files())
    with pytest.raises(data.DataError, match=r"slice \[:999\] incompatible with 200 examples"):
        data.load(cfg.replace(eval_limit=999), str(tmp_path), str(manual))


def test_cli_without_tensorflow_exits_2_on_a_broken_tree(tmp_path, monkeypatch, capsys):
    no_tfds(monkeypatch)
    manual = fx.write_folder(tmp_path / "manual", fx.broken("no wnids"))
    code = run.main(["--exp", "tiny_baseline", "--data-dir", str(tmp_path / "d"),
                     "--manual-dir", str(manual), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "wnids.txt is missing" in err and "Traceback" not in err


@pytest.mark.slow
def test_real_dataset_reader_equals_the_tfds_path(tmp_path):
    """Both paths on the real archives: 2 train shards, order and labels exact, pixels close."""
    import time

    if not (TINY_FILES / tin.TAR_NAMES[0]).is_file():
        pytest.skip(f"real Tiny ImageNet archives not found in {TINY_FILES}")
    b = data.prepare("tiny_imagenet", str(tmp_path / "tfds"), str(TINY_FILES))
    assert b.info.splits["train"].shard_lengths == [50_000, 50_000]
    start = time.monotonic()
    requests = [("train", None), ("validation", None), ("train", 60_000)]
    rows = files.read("tiny_imagenet", TINY_FILES, requests, tmp_path / "cache", names=True)
    decode_s = time.monotonic() - start
    (cache,) = (tmp_path / "cache").glob("*.npz")
    print(f"\ndecoded the real Tiny ImageNet in {decode_s:.0f} s; cache {cache.stat().st_size:,} bytes")
    for r, (split, limit) in zip(rows, requests):
        diff = assert_same(b, r, split, limit, REAL_MAX_DIFF, REAL_MEAN_DIFF)
        print(f"{split}[:{limit}]: max |diff| {diff.max()}, mean {diff.mean():.3f}, "
              f"pixels differing {np.mean(diff > 0):.3%}")
    assert np.bincount(rows[0][1], minlength=200).tolist() == [500] * 200
    assert np.bincount(rows[1][1], minlength=200).tolist() == [50] * 200
