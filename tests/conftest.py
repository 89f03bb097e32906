"""Shared fixtures. Real-data fixtures skip when ../shared/data (beside the repo) is absent."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
FMNIST_FILES = SHARED / "fashion-mnist"
TINY_FILES = SHARED / "tiny-imagenet-200"


# The default run's costliest files, most CPU-seconds first (2-core AMD EPYC, 2026-11-27: 138 s
# down to 66 s each; every other file under 31 s). pytest-xdist hands whole files to its two
# workers in collection order (pyproject.toml: --dist loadfile --no-loadscope-reorder), so the
# long ones start early and the short ones fill in at the end: by test count, its default,
# test_parallel.py (one 66 s test) went last and ran alone while the other worker idled.
HEAVIEST_FIRST = ("test_torch_twin", "test_damage", "test_multihost", "test_reproduce",
                  "test_cli", "test_seeds", "test_train", "test_reliability",
                  "test_speed_numerics", "test_parallel")


def pytest_collection_modifyitems(items: list) -> None:
    """Costly files first, the rest after them in their usual order (a stable sort)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(scope="package", autouse=True)
def settled_garbage():
    """At the end of a test run: collect garbage once, then freeze what is left. pytest then
    collects five more times at exit (for unraisable exceptions), each 0.2-0.6 s over a
    worker's JAX and TensorFlow objects; pytest-xdist interrupts a worker that is still busy
    5 s after the run ends (SIGINT, printed as a `KeyboardInterrupt` in JAX's gc callback).
    This teardown runs after the worker's last test, before it reports finished; garbage made
    after the freeze is still collected."""
    yield
    gc.collect()
    gc.freeze()


def run_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this test run, the same for all its pytest-xdist workers (`-n`), so that what
    one worker builds the others reuse; fresh per test run either way."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name  # the run's folder above each worker's
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="package", autouse=True)
def compile_cache(tmp_path_factory):
    """One XLA compilation cache for the test run, in-process and in every `jaxbench.run`
    subprocess, shared by the xdist workers: the many tests that compile the same small programs
    compile each once. Fresh per test run (not ~/.cache), so a run's timing and results never
    depend on an earlier one."""
    path = str(run_folder(tmp_path_factory, "xla-cache"))
    old = os.environ.get("JAXBENCH_COMPILE_CACHE")
    os.environ["JAXBENCH_COMPILE_CACHE"] = path
    from jaxbench import cli

    cli.enable_compile_cache()
    yield path
    if old is None:
        os.environ.pop("JAXBENCH_COMPILE_CACHE", None)
    else:
        os.environ["JAXBENCH_COMPILE_CACHE"] = old


@pytest.fixture(scope="package")
def fmnist_tfds_dir(tmp_path_factory) -> Path:
    """A tfds data_dir with the real Fashion-MNIST prepared offline from ../shared/data."""
    if not (FMNIST_FILES / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST files not found in {FMNIST_FILES}")
    from filelock import FileLock

    from jaxbench import data

    folder = run_folder(tmp_path_factory, "fmnist-tfds")
    with FileLock(str(folder / "prepare.lock")):  # one worker prepares, the others wait
        if not (folder / "prepared").exists():
            data.prepare("fashion_mnist", str(folder / "tfds"), str(FMNIST_FILES))
            (folder / "prepared").touch()
    return folder / "tfds"


def synthetic_split(n: int, shape=(28, 28, 1), classes: int = 10, seed: int = 0):
    """A learnable toy split: each class is a distinct brightness level plus noise."""
    from jaxbench.data import Split

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    base = (labels * (200 // classes) + 20).astype(np.float32)
    images = base[:, None, None, None] + rng.normal(0, 8, (n, *shape))
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels)


@pytest.fixture
def mock_manual_dir(tmp_path) -> Path:
    """A manual_dir with the four Fashion-MNIST file names, for runs under tfds.testing.mock_data.

    The files are never read: the mocked download_and_prepare is a no-op; they only get our own
    offline check past its "file missing" error.
    """
    from jaxbench import data

    manual = tmp_path / "manual"
    manual.mkdir()
    for name in data.MANUAL_FILES["fashion_mnist"]:
        (manual / name).touch()
    return manual
