"""Data: tfds -> uint8 arrays in host memory once; shuffling as index arrays; preprocessing on device.

Both frameworks share everything here except `preprocess`, which is pure jax.numpy (the PyTorch
twin has its own copy of the same arithmetic). Keeping the dataset as uint8 keeps memory at one
byte per pixel (Tiny ImageNet train: 1.2 GB) and makes the host->device copy 4x smaller than
float32; resizing and normalization happen per batch inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads files here: keep it quiet

import jax
import jax.numpy as jnp
import numpy as np

# The tfds file names that a manual_dir must hold for each dataset, for error messages.
MANUAL_FILES = {
    "fashion_mnist": (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ),
    "tiny_imagenet": ("tiny-imagenet-200.zip (or an extracted tiny-imagenet-200/ folder, or the two "
                      "tiny-imagenet-200_*.tar.gz archives)",),
}


class DataError(RuntimeError):
    """Data that cannot be had or trusted; the CLI prints the message and exits 2."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in host memory: images uint8 (N, H, W, C), labels int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def without_images(self) -> "Split":
        """Labels only: lets the host copy go once the images live on the device."""
        return Split(np.empty((0, *self.images.shape[1:]), np.uint8), self.labels)


def _tfds():
    """Import tfds lazily (it pulls in TensorFlow) and register our own builders with it."""
    import tensorflow_datasets as tfds

    # Importing the builder module registers `tiny_imagenet` with tfds.
    import jaxbench.datasets.tiny_imagenet.tiny_imagenet_dataset_builder  # noqa: F401

    return tfds


def have_tfds() -> bool:
    """Whether tensorflow-datasets imports here; without it `load` reads the official files."""
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir(data_dir: str | None = None) -> Path:
    """Where the TensorFlow-free reader caches decoded arrays: `DATA_DIR/jaxbench_arrays` with
    --data-dir, else `$XDG_CACHE_HOME/jaxbench` (`~/.cache/jaxbench`)."""
    if data_dir is not None:
        return Path(data_dir) / "jaxbench_arrays"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxbench"


def _check_manual_dir(dataset: str, manual_dir: str) -> Path:
    """The manual_dir as a Path once it plausibly holds `dataset`; DataError naming what lacks."""
    expected = ", ".join(MANUAL_FILES[dataset])
    folder = Path(manual_dir)
    if not folder.is_dir():
        raise DataError(f"--manual-dir {manual_dir}: not a folder (missing, or a file). It must hold "
                        f"{expected}.")
    if dataset == "fashion_mnist":
        missing = [f for f in MANUAL_FILES[dataset] if not (folder / f).is_file()]
        if missing:
            raise DataError(
                f"--manual-dir {manual_dir} lacks {', '.join(missing)}: {dataset} needs the four "
                f"official files ({expected}) there to prepare offline."
            )
    else:
        from jaxbench.datasets.tiny_imagenet import source as tin

        try:
            tin.locate(folder)
        except tin.SourceError as err:
            raise DataError(f"--manual-dir: {err}") from None
    return folder


def _check_data_dir(data_dir: str | None) -> None:
    """--data-dir must be a folder or not exist yet (tfds creates it)."""
    if data_dir is None:
        return
    path = Path(data_dir)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise DataError(f"--data-dir {data_dir}: {p} is a file, not a folder; pass a folder "
                            "(it is created when missing).")


def _download_hosts(b) -> list[tuple[str, int]]:
    """(host, port) of every URL registered in the builder's checksums, for a quick probe."""
    from urllib.parse import urlsplit

    hosts = []
    for url in sorted(b.url_infos or {}):
        parts = urlsplit(url)
        host = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if parts.hostname and host not in hosts:
            hosts.append(host)
    return hosts


def _unreachable(hosts: list[tuple[str, int]], timeout: float = 5.0) -> str | None:
    """Why the download hosts cannot be reached (None if they can). Seconds, not tfds' minutes
    of retries: offline, name resolution fails at once."""
    import socket

    if os.environ.get("JAXBENCH_OFFLINE", "") not in ("", "0"):
        return "JAXBENCH_OFFLINE is set"
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            return f"cannot reach {host}: {err}"
    return None


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None):
    """Prepare `dataset` with tfds and return the builder.

    With `manual_dir`, offline from the files there: tfds looks for every expected file in
    manual_dir before downloading and verifies its checksum, so an offline preparation is exactly
    as trustworthy as a download. Without, tfds downloads the registered URLs and verifies their
    checksums; when the hosts cannot be reached, a DataError says to pass --manual-dir.
    """
    _check_data_dir(data_dir)
    tfds = _tfds()
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    b = tfds.builder(dataset, data_dir=data_dir)
    if manual_dir is not None:  # checked even when prepared: a typo there should not go unseen
        try:
            _check_manual_dir(dataset, manual_dir)
        except DataError as err:
            if not b.is_prepared():
                raise
            raise DataError(f"{err} {dataset} is already prepared in the tfds data dir "
                            f"({b.data_dir}): drop --manual-dir to train from there.") from None
    if b.is_prepared():
        return b
    expected = ", ".join(MANUAL_FILES[dataset])
    if manual_dir is None:
        offline = (
            f"{dataset} is not prepared in the tfds data dir ({b.data_dir}), no --manual-dir was "
            f"given, and it could not be downloaded"
        )
        advice = (
            f"Download the official files ({expected}) into a folder and pass it as "
            f"--manual-dir DIR (this repository's ../shared/data holds them), or point --data-dir "
            f"at a folder where the dataset is already prepared."
        )
        reason = _unreachable(_download_hosts(b))
        if reason is not None:
            raise DataError(f"{offline} ({reason}). {advice}")
        try:
            b.download_and_prepare()
        except NonMatchingChecksumError as err:
            first = str(err).splitlines()[0]
            raise DataError(f"{first} A download of {dataset} does not match its registered "
                            f"checksum; nothing was prepared. {advice}") from None
        except ValueError as err:  # the builder's own checks of what it downloaded (SourceError)
            raise DataError(f"{err} (preparing {dataset} from its download)") from None
        except Exception as err:  # noqa: BLE001  network errors come in many types
            first = (str(err).splitlines() or [type(err).__name__])[0][:300]
            raise DataError(f"{offline} ({type(err).__name__}: {first}). {advice}") from None
        return b
    folder = _check_manual_dir(dataset, manual_dir)
    config = tfds.download.DownloadConfig(manual_dir=str(folder))
    try:
        b.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as err:
        first = str(err).splitlines()[0]
        raise DataError(
            f"{first} The file in --manual-dir {manual_dir} is not the official one (truncated or "
            f"altered): replace it with the original download."
        ) from None
    except (OSError, ValueError, EOFError) as err:  # the builders' SourceError is a ValueError
        raise DataError(f"{err} (preparing {dataset} from --manual-dir {manual_dir})") from None
    return b


def load_split(b, split: str, limit: int | None = None, chunk: int = 4096) -> Split:
    """Read a prepared split (its first `limit` examples) into uint8 numpy arrays.

    Chunks are copied into preallocated arrays, so peak memory is the dataset plus one chunk.
    The shard interleave is pinned to tfds' defaults, so the order stays the one the
    TensorFlow-free reader reproduces (jaxbench/datasets/tfds_order.py).
    """
    from jaxbench.datasets import tfds_order

    tfds = _tfds()
    spec = split if limit is None else f"{split}[:{limit}]"
    read_config = tfds.ReadConfig(try_autocache=False,
                                  interleave_cycle_length=tfds_order.CYCLE_LENGTH,
                                  interleave_block_length=tfds_order.BLOCK_LENGTH)
    try:
        ds = b.as_dataset(split=spec, shuffle_files=False, read_config=read_config)
    except ValueError as err:  # e.g. a slice beyond the split, an unknown split name
        raise DataError(f"cannot read split {spec!r} of {b.name}: {err}") from None
    n = int(ds.cardinality())
    if n < 0:  # unknown cardinality: collect, then stack
        rows = list(tfds.as_numpy(ds.batch(chunk)))
        return Split(np.concatenate([r["image"] for r in rows]),
                     np.concatenate([r["label"] for r in rows]).astype(np.int32))
    shape = tuple(b.info.features["image"].shape)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty((n,), np.int32)
    start = 0
    for rows in tfds.as_numpy(ds.batch(chunk)):
        stop = start + len(rows["label"])
        images[start:stop] = rows["image"]
        labels[start:stop] = rows["label"]
        start = stop
    if start != n:
        raise DataError(f"split {spec!r} of {b.name} held {start} examples, its metadata says {n}.")
    return Split(images, labels)


def load_files(cfg, data_dir: str | None = None, manual_dir: str | None = None,
               shards: int | None = None) -> tuple[Split, Split]:
    """(train, eval) read straight from the official files in `manual_dir`, without TensorFlow.

    Same arrays, labels and order as the tfds path (see jaxbench/datasets/files.py); Tiny
    ImageNet's decoded arrays are cached under `cache_dir(data_dir)`. `shards` is for tests
    only (a tfds preparation forced to that many shards).
    """
    from jaxbench.datasets import files

    expected = ", ".join(MANUAL_FILES[cfg.dataset])
    if manual_dir is None:
        raise DataError(
            f"tensorflow-datasets is not installed here, so {cfg.dataset} is read straight from "
            f"its official files, and no --manual-dir was given: download them ({expected}) into "
            f"a folder and pass it as --manual-dir DIR (this repository's ../shared/data holds "
            f"them), or use --arrays FILE.npz from `python -m jaxbench.data export`."
        )
    folder = _check_manual_dir(cfg.dataset, manual_dir)
    try:
        (train, test) = files.read(cfg.dataset, folder, [(cfg.train_split, cfg.train_limit),
                                                         (cfg.eval_split, cfg.eval_limit)],
                                   cache_dir(data_dir), shards)
    except (OSError, ValueError, EOFError) as err:  # SourceError is a ValueError
        raise DataError(f"{err} (reading {cfg.dataset} from --manual-dir {manual_dir} without "
                        f"TensorFlow)") from None
    return Split(*train), Split(*test)


def load(cfg, data_dir: str | None = None, manual_dir: str | None = None,
         arrays: str | None = None, reader: str | None = None) -> tuple[Split, Split]:
    """(train, eval) splits of an experiment, honouring its train/eval limits.

    `arrays` reads an .npz written by `export` instead (tests that run the CLI in a subprocess
    on synthetic data). `reader` is "tfds" or "files"; by default tfds when it can be imported,
    else the TensorFlow-free reader of the official files in `manual_dir` (the GPU image).
    """
    if arrays is not None:
        return load_arrays(arrays, cfg)
    if reader is None:
        reader = "tfds" if have_tfds() else "files"
    if reader == "files":
        _check_data_dir(data_dir)  # the tfds path checks it in `prepare`
        return load_files(cfg, data_dir, manual_dir)
    if reader != "tfds":
        raise ValueError(f"reader must be 'tfds' or 'files', got {reader!r}")
    b = prepare(cfg.dataset, data_dir, manual_dir)
    return (load_split(b, cfg.train_split, cfg.train_limit),
            load_split(b, cfg.eval_split, cfg.eval_limit))


def save_arrays(path: str | Path, dataset: str, train: Split, test: Split) -> None:
    np.savez(path, dataset=dataset, train_images=train.images, train_labels=train.labels,
             eval_images=test.images, eval_labels=test.labels)


def open_arrays(path: str | Path) -> np.lib.npyio.NpzFile:
    """The .npz archive at `path`; ValueError for a lone array (.npy), OSError for no file."""
    z = np.load(path)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError("a single array (.npy), not an .npz archive")
    return z


def load_arrays(path: str | Path, cfg) -> tuple[Split, Split]:
    try:
        with open_arrays(path) as z:
            if str(z["dataset"]) != cfg.dataset:
                raise DataError(f"--arrays {path} holds {z['dataset']}, but {cfg.name} trains on "
                                f"{cfg.dataset}; export that dataset instead.")
            return (Split(z["train_images"][:cfg.train_limit], z["train_labels"][:cfg.train_limit]),
                    Split(z["eval_images"][:cfg.eval_limit], z["eval_labels"][:cfg.eval_limit]))
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"--arrays {path}: not an array file written by `python -m jaxbench.data "
                        f"export` ({err}).") from None


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 train images, in [0, 1].

    Exact and light: a 256-bin histogram per channel, chunk by chunk, instead of a float copy of
    the dataset (Tiny ImageNet train would need 10 GB as float64).
    """
    c = images.shape[-1]
    hist = np.zeros((c, 256), np.int64)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        for ch in range(c):
            hist[ch] += np.bincount(part[..., ch].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(1)
    mean = hist @ levels / count
    var = hist @ levels**2 / count - mean**2
    return mean.astype(np.float32), np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-6).astype(np.float32)


def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array, size: int = 64) -> jax.Array:
    """uint8 (B, H, W, C) -> float32 (B, size, size, 3): bilinear resize, normalize, 1->3 channels.

    Runs inside the jitted step. Normalizing before replicating the channel does a third of
    the arithmetic for Fashion-MNIST; the result is the same.
    """
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="bilinear")
    x = (x - mean) / std
    return jnp.broadcast_to(x, (b, size, size, 3)) if c == 1 else x


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in `n` training examples; DataError when there is none, before any work."""
    if n < batch_size:
        raise DataError(f"{n} training examples are fewer than one batch of {batch_size}; "
                        "lower --batch-size or raise --train-limit.")
    return n // batch_size


def epoch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """Shuffled example indices for one epoch as (steps, batch_size) int32.

    Seeded by (seed, epoch) alone, so an epoch's order does not depend on the ones before it
    (a resumed run and both frameworks see the same batches). The last partial batch is dropped,
    as the paper's PyTorch-style loaders with drop_last do; every epoch sees a different remainder.
    """
    steps = steps_per_epoch(n, batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def eval_order(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every eval example exactly once, in order: indices and a validity mask, (steps, batch).

    The last batch is padded with index 0 and masked out, so no example is dropped and the
    step keeps one static shape (one compilation).
    """
    steps = -(-n // batch_size)
    idx = np.arange(steps * batch_size, dtype=np.int32)
    mask = idx < n
    return np.where(mask, idx, 0).reshape(steps, batch_size), mask.reshape(steps, batch_size)


if __name__ == "__main__":  # `python -m jaxbench.data export ...`
    from jaxbench.cli import export_main

    raise SystemExit(export_main())
