"""Read the datasets straight from their official files, without TensorFlow.

For machines without tensorflow-datasets (the GPU image): `jaxbench.data.load` comes here when
`import tensorflow_datasets` fails. The result equals the tfds path's:

* **Fashion-MNIST**: the four idx `.gz` files, checked against the sha256 values tfds registers
  for them (`FMNIST_SHA256`), parsed with numpy. Arrays, labels and order equal the tfds path's
  exactly (tfds stores the pixels as lossless PNG).
* **Tiny ImageNet**: the files our tfds builder reads (zip, folder or the two tar.gz archives),
  listed, checked and labelled by the builder's own code (`tiny_imagenet/source.py`), decoded
  with PIL (grayscale -> RGB). Same files, same labels, same order as the tfds path; pixels
  within JPEG decoder tolerance (tfds decodes with TensorFlow's libjpeg-turbo settings, PIL with
  its own: a few levels apart on some pixels; the grayscale images, stored by the builder as
  PNG, decode identically).

Order: tfds yields a split in the order of md5(split + example key), cut into shards and read
back interleaved; `tfds_order` reproduces that exactly, so `split[:limit]` selects the same
examples on both paths.

Decoding the 110,000 Tiny ImageNet JPEGs takes a while, so the decoded arrays are cached in one
`.npz` per source (`cache_dir/tiny_imagenet-<digest>.npz`), keyed by the source files' names,
sizes and modification times plus this reader's version. A cache that fails its checks (other
key, damaged file, CRC mismatch) is rebuilt, with a warning; it is never trusted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxbench.datasets import tfds_order
from jaxbench.datasets.tiny_imagenet import source as tin
from jaxbench.datasets.tiny_imagenet.source import SourceError

READER_VERSION = 1  # bump when the cached content would change for the same source files

FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the official files, as tensorflow-datasets registers them
# (tensorflow_datasets/url_checksums/fashion_mnist.txt; a test checks they still agree).
FMNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
FMNIST_SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000)}

DATASETS = ("fashion_mnist", "tiny_imagenet")
SPLITS = {"fashion_mnist": tuple(FMNIST_SPLITS), "tiny_imagenet": tin.SPLITS}


class CacheWarning(UserWarning):
    """A cache file was unusable (damaged or stale) and is being rebuilt."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read(dataset: str, manual_dir: str | Path, requests: Sequence[tuple[str, int | None]],
         cache_dir: str | Path | None = None, shards: int | None = None, names: bool = False
         ) -> list[tuple[np.ndarray, ...]]:
    """(images uint8 (N, H, W, C), labels int32 (N,)) for each (split, limit) in `requests`.

    With `names`, a third array holds each example's tfds key (Tiny ImageNet: the file name,
    tfds' `file_name` feature; Fashion-MNIST: the index in the idx file).

    `limit` takes the first examples the way tfds' `split[:limit]` does. `shards` mirrors a tfds
    preparation forced to that many shards (DownloadConfig(num_shards=...); tests only). Raises
    SourceError (a ValueError) naming the file on bad input; no cache when `cache_dir` is None.
    """
    if dataset not in DATASETS:
        raise SourceError(f"no reader for dataset {dataset!r}; known: {', '.join(DATASETS)}.")
    for split, _ in requests:
        if split not in SPLITS[dataset]:
            raise SourceError(f"{dataset} has no split {split!r}; it has "
                              f"{', '.join(SPLITS[dataset])}.")
    manual_dir = Path(manual_dir)
    if dataset == "fashion_mnist":
        return [_fmnist_split(manual_dir, split, limit, names) for split, limit in requests]
    splits = _tiny_splits(manual_dir, None if cache_dir is None else Path(cache_dir))
    out = []
    for split, limit in requests:
        images, labels, keys, sizes = splits[split]
        idx = _read_order(dataset, split, list(keys), sizes, limit, shards)
        if len(idx) == len(labels) and np.array_equal(idx, np.arange(len(labels))):
            row = (images, labels, keys)  # the cache is in this order already: no copy
        else:
            row = (images[idx], labels[idx], keys[idx])
        out.append(row if names else row[:2])
    return out


# -- Fashion-MNIST -------------------------------------------------------------------------------

def _verified(path: Path) -> bytes:
    if not path.is_file():
        raise SourceError(f"{path} is missing: Fashion-MNIST needs the four official files "
                          f"({', '.join(FMNIST_SHA256)}) there.")
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if digest != FMNIST_SHA256[path.name]:
        raise SourceError(f"{path}: wrong checksum (sha256 {digest}; the official file's, as "
                          f"tfds registers it, is {FMNIST_SHA256[path.name]}). The file is "
                          "truncated or altered: replace it with the original download.")
    return content


def _idx(content: bytes, path: Path, magic: int, dims: int) -> np.ndarray:
    raw = gzip.decompress(content)
    header = np.frombuffer(raw[:4 + 4 * dims], ">u4")
    if len(header) != 1 + dims or header[0] != magic:
        raise SourceError(f"{path}: not an idx file of the expected kind.")
    shape = tuple(int(d) for d in header[1:])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: header says {shape}, body holds {body.size} bytes.")
    return body.reshape(shape)


def _fmnist_split(manual_dir: Path, split: str, limit: int | None, names: bool = False
                  ) -> tuple[np.ndarray, ...]:
    images_name, labels_name, n = FMNIST_SPLITS[split]
    images = _idx(_verified(manual_dir / images_name), manual_dir / images_name, 2051, 3)
    labels = _idx(_verified(manual_dir / labels_name), manual_dir / labels_name, 2049, 1)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise SourceError(f"{manual_dir}: {images_name} / {labels_name} hold {images.shape} / "
                          f"{labels.shape}, expected ({n}, 28, 28) / ({n},).")
    # tfds' builder yields (index, example) in file order; the whole split, PNG-encoded, is far
    # below tfds' 128 MiB two-shard threshold (60,000 x at most ~900 bytes), so one shard.
    idx = _read_order("fashion_mnist", split, range(n), None, limit, 1)
    row = (images[idx][..., None], labels[idx].astype(np.int32))
    return (*row, idx) if names else row


def _read_order(dataset, split, keys, sizes, limit, shards) -> np.ndarray:
    try:
        return tfds_order.split_read_order(split, keys, sizes, limit, shards)
    except ValueError as err:  # a limit beyond the split: the message tfds' path gives
        spec = split if limit is None else f"{split}[:{limit}]"
        raise SourceError(f"cannot read split {spec!r} of {dataset}: {err}") from None


# -- Tiny ImageNet -------------------------------------------------------------------------------

def _tiny_example_size(stored_len: int, label: int, name: str) -> int:
    """Serialized size of the builder's example (image bytes, label, file_name)."""
    return tfds_order.example_size({"image": ("bytes", stored_len), "label": ("int64", label),
                                    "file_name": ("bytes", len(name.encode("utf-8")))})


def _tiny_decode(manual_dir: Path) -> dict[str, tuple]:
    """Decode both splits; per split (images, labels, keys, sizes) in tfds' full read order."""
    start = time.monotonic()
    where = manual_dir
    log(f"tiny_imagenet: reading {where} (no TensorFlow: decoding with PIL; cached afterwards)")
    where, files = tin.find_source(manual_dir)
    classes = tin.wnids()
    label_of = {w: i for i, w in enumerate(classes)}
    items = tin.index(files, where, classes)
    total = sum(len(v) for v in items.values())
    done, last = 0, time.monotonic()
    out = {}
    for split, entries in items.items():
        n = len(entries)
        images = np.empty((n, 64, 64, 3), np.uint8)
        labels = np.empty(n, np.int32)
        keys, sizes = [], np.empty(n, np.int64)
        for i, (rel, wnid) in enumerate(entries):
            pixels, stored = tin.decode(files[rel](), f"{tin.ROOT}/{rel}")
            images[i] = pixels
            labels[i] = label_of[wnid]
            keys.append(tin.key(rel))
            sizes[i] = _tiny_example_size(stored, int(labels[i]), keys[-1])
            done += 1
            now = time.monotonic()
            if now - last >= 5.0:
                log(f"tiny_imagenet: decoded {done:,}/{total:,} images "
                    f"({100 * done / total:.0f}%, {now - start:.0f} s)")
                last = now
        try:
            order = tfds_order.split_read_order(split, keys, sizes)
        except ValueError as err:
            raise SourceError(f"{where}: {err}") from None
        out[split] = (images[order], labels[order], np.asarray(keys)[order], sizes[order])
    log(f"tiny_imagenet: decoded {total:,} images in {time.monotonic() - start:.0f} s")
    return out


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def cache_path(cache_dir: Path, dataset: str, identity: list) -> tuple[Path, dict]:
    key = {"dataset": dataset, "reader_version": READER_VERSION,
           "sources": [list(entry) for entry in identity]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{dataset}-{digest}.npz", key


def _load_cache(path: Path, key: dict) -> dict[str, tuple] | None:
    """The cached splits, or None (with a warning) when the file is not exactly what key says."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("key") != key:
                raise ValueError("it was written for other source files")
            out = {}
            for split in tin.SPLITS:
                arrays = tuple(z[f"{split}_{part}"] for part in ("images", "labels", "keys", "sizes"))
                for part, array in zip(("images", "labels", "keys", "sizes"), arrays):
                    if _crc(array) != meta["crc32"][f"{split}_{part}"]:
                        raise ValueError(f"{split}_{part} fails its CRC")
                n = len(arrays[1])
                if arrays[0].shape != (n, 64, 64, 3) or arrays[0].dtype != np.uint8 or not (
                        len(arrays[2]) == len(arrays[3]) == n):
                    raise ValueError(f"{split} arrays have inconsistent shapes")
                out[split] = arrays
            return out
    except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile,
            zlib.error, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring the decoded-array cache {path} ({err}); decoding again and "
                      "rewriting it.", CacheWarning, stacklevel=3)
        return None


def _write_cache(path: Path, key: dict, splits: dict[str, tuple]) -> None:
    members = {}
    for split, arrays in splits.items():
        for part, array in zip(("images", "labels", "keys", "sizes"), arrays):
            members[f"{split}_{part}"] = array
    meta = {"key": key, "crc32": {name: _crc(a) for name, a in members.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **members)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except OSError as err:
        warnings.warn(f"could not write the decoded-array cache {path} ({err}); the next run "
                      "decodes again.", CacheWarning, stacklevel=3)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return
    log(f"tiny_imagenet: cached the decoded arrays in {path} "
        f"({path.stat().st_size / 1e9:.2f} GB)")


def _tiny_splits(manual_dir: Path, cache_dir: Path | None) -> dict[str, tuple]:
    if cache_dir is None:
        return _tiny_decode(manual_dir)
    path, key = cache_path(cache_dir, "tiny_imagenet", tin.identity(manual_dir))
    if path.is_file():
        cached = _load_cache(path, key)
        if cached is not None:
            log(f"tiny_imagenet: read the decoded arrays from {path}")
            return cached
    splits = _tiny_decode(manual_dir)
    _write_cache(path, key, splits)
    return splits
