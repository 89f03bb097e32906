"""A run's files: metrics.jsonl and summary.json per seed, and a seed group's summary.

Every file is written to a temporary name and renamed, so a crash never leaves a torn file; in a
multi-process run only process 0 writes. A write that fails (a full disk, a refused permission)
raises `OutputError` naming the file; the file keeps its previous complete version.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxbench.config import Config, ConfigError

CURVE_KEYS = ("train_loss", "train_acc", "eval_loss", "eval_acc")
# Exit code of a run stopped because writing its outputs or checkpoints failed mid-run (a full
# disk, a permission taken away, an I/O error); 2 is for paths unusable from the start.
EXIT_OUTPUT_FAILED = 4


class OutputError(RuntimeError):
    """Writing a run's file or checkpoint failed (ENOSPC, EACCES, EIO...): the CLI exits 4.

    Everything written before stays whole: files are replaced atomically, checkpoints are
    committed only once complete.
    """

    def __init__(self, path: Path | str, err: BaseException, what: str = "writing"):
        self.path, self.err = Path(path), err
        reason = describe(err)
        super().__init__(f"{what} {path} failed: {reason}")


class OutputPathError(ConfigError):
    """An output folder (--out, --checkpoint-dir) that cannot be used: the CLI exits 2."""


def describe(err: BaseException) -> str:
    """An error in one line: the OS's words and errno name when there is one."""
    import errno as errno_lib

    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code:
        name = errno_lib.errorcode.get(code, str(code))
        return f"{os.strerror(code)} ({name})"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {first[:300]}"


def check_dir(path: Path, flag: str) -> Path:
    """`path` can be a folder we write in: it is one, or the nearest folder above it that exists
    is writable. Creates nothing, so a run can check its output paths before loading the data
    (Tiny ImageNet takes seconds to minutes) and still leave nothing behind when the data fails.
    `flag` is the option the path came from (`--out`, `--checkpoint-dir`), named in the message.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag}: {path} is a file, not a folder; pass a folder (it is "
                              "created when missing).")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"{flag}: cannot create {path}: {parent} is a file, not a "
                                  "folder; pass another path.")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag}: cannot create or write the folder {path} ({existing} is "
                              "not writable); pass a writable path.")
    return path


def ensure_dir(path: Path, flag: str) -> Path:
    """Create `path` (and its parents) and check a file can be written in it; else exit-2 error."""
    path = check_dir(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".jaxbench-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputPathError(f"{flag}: cannot create or write the folder {path} "
                              f"({describe(err)}); pass a writable path.") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a truncated file.

    On failure (a full disk...) the temporary file is removed, `path` keeps its previous
    version, and `OutputError` names the file.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OutputError(path, err) from err
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def params_digest(trainer, state, member: int = 0) -> str:
    """sha256 over one seed's final parameters: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for leaf in trainer.param_leaves(state, member):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def summarize_history(history: list[dict]) -> dict:
    """Final and best accuracy, and the steady seconds per epoch: epochs after the first (its
    warm-up), leaving out an epoch resumed mid-way, whose time covers only the steps trained
    after the resume."""
    if not history:
        return {"epochs_completed": 0}
    # Epochs timed on the hardware the run ended on: a run resumed elsewhere (a suite stopped on
    # one GPU, continued on another) keeps the first machine's rows, which time other hardware.
    here = history[-1].get("hardware")
    history_here = [r for r in history if r.get("hardware", here) == here]
    whole = [r for r in history_here if "resumed_at_step" not in r]
    steady = ([r for r in history_here[1:] if "resumed_at_step" not in r] or whole
              or history_here)
    best = max(history, key=lambda r: r["eval_acc"])
    return {"epochs_completed": history[-1]["epoch"], "final_eval_acc": history[-1]["eval_acc"],
            "final_eval_loss": history[-1]["eval_loss"], "best_eval_acc": best["eval_acc"],
            "best_epoch": best["epoch"],
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in steady) / len(steady),
            "first_epoch_time_s": history[0]["epoch_time_s"],
            **({"epochs_timed_here": len(history_here)} if len(history_here) < len(history)
               else {})}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(framework: str = "jax") -> dict[str, Any]:
    """Where and with what a run happened, for summary.json."""
    import flax
    import jax
    import jaxlib
    import optax

    dev = jax.devices()[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__, "numpy": np.__version__}
    try:
        import tensorflow_datasets as tfds
        versions["tfds"] = tfds.__version__
    except ImportError:
        versions["tfds"] = None
    if framework == "torch":
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            return {"device": {"platform": "gpu", "name": torch.cuda.get_device_name(),
                               "count": torch.cuda.device_count(), "cpu": cpu_name(),
                               "cores": os.cpu_count()}, "versions": versions}
        return {"device": {"platform": "cpu", "name": "cpu", "count": 1, "cpu": cpu_name(),
                           "cores": os.cpu_count(), "threads": torch.get_num_threads()},
                "versions": versions}
    return {"device": {"platform": dev.platform, "name": dev.device_kind,
                       "count": jax.device_count(), "cpu": cpu_name(), "cores": os.cpu_count()},
            "versions": versions}


def hardware_of(device: dict) -> str:
    """'NVIDIA H200', or the CPU model and core count for CPU runs: the report's hardware
    column, and each metrics row's, which tells epochs timed on other hardware apart."""
    if device.get("platform", "cpu") != "cpu" or device.get("gpu"):  # a GPU, a TPU...
        name = device.get("gpu") or device.get("name", device.get("platform", "GPU"))
        return f"{device['count']}x {name}" if device.get("count", 1) > 1 else name
    cpu = re.sub(r"\((R|TM)\)", "", device.get("cpu") or "unknown CPU").replace("  ", " ").strip()
    return f"{cpu}, {device.get('cores', '?')} cores"


def seed_dir(out_dir: Path, seed: int, grouped: bool) -> Path:
    """Where one seed's files go: the run folder itself, or `seed<S>/` inside a group's."""
    return out_dir / f"seed{seed}" if grouped else out_dir


class Outputs:
    """The files of each seed of a run (one seed, or a `--seeds` group)."""

    def __init__(self, cfg: Config, trainer, out_dir: Path, framework: str,
                 extra: dict | None, state: Any):
        import jax

        self.dir, self.seeds, self.grouped = out_dir, trainer.seeds, trainer.grouped
        self.framework = framework
        self.primary = framework != "jax" or jax.process_index() == 0
        common = {"experiment": cfg.name, "framework": framework,
                  "params": trainer.param_count(state),
                  "compile_time_s": trainer.compile_time_s,
                  **environment_info(framework), **trainer.record(),
                  "normalization": {"mean": trainer.mean.tolist(), "std": trainer.std.tolist()},
                  "eval_split": cfg.eval_split, "train_examples": trainer.train_size,
                  "eval_examples": trainer.eval_size, **(extra or {})}
        if self.grouped:
            common["seed_group"] = list(self.seeds)
        self.summaries = [{**common, "config": cfg.replace(seed=s).to_dict()} for s in self.seeds]
        self.hardware = hardware_of(common["device"])  # recorded in each metrics row

    @property
    def summary(self) -> dict:
        return self.summaries[0]

    def write(self, histories: Sequence[list[dict]], finals: Sequence[dict] | None = None) -> None:
        for i, seed in enumerate(self.seeds):
            self.summaries[i].update(summarize_history(histories[i]), **(finals[i] if finals else {}))
            if self.primary:
                folder = seed_dir(self.dir, seed, self.grouped)
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise OutputError(folder, err, "creating") from err
                write_atomic(folder / "metrics.jsonl",
                             "".join(json.dumps(r) + "\n" for r in histories[i]))
                write_json(folder / "summary.json", self.summaries[i])
        if self.grouped and self.primary:
            write_json(self.dir / "summary.json", group_summary(self.summaries, histories))


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), with the values and n."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def seed_epoch_time(summary: dict) -> float:
    """One seed's train seconds per epoch. A JAX seed group trains its seeds together and each
    seed's summary records the group's epoch; its seed's share is that over the group's size
    (the twin's `--seeds` runs one seed after another, `sequential`: its own time)."""
    t, group = summary["mean_epoch_time_s"], summary.get("seed_group")
    return t / len(group) if group and not summary.get("sequential") else t


def group_summary(summaries: Sequence[dict], histories: Sequence[list[dict]],
                  separate: bool = False) -> dict:
    """A seed group's summary: mean ± sample std over its seeds, and mean curves per epoch.

    `group_epoch_time_s` is the wall time of one epoch of the whole group: all seeds together
    for JAX; one after another for the PyTorch twin (`sequential`) and for seeds `separate`ly
    trained (the suite's runs, some of them maybe groups): the sum of the seeds' shares.
    """
    first = summaries[0]
    epochs = min(len(h) for h in histories)
    out = {"kind": "seed_group", "experiment": first["experiment"],
           "framework": first["framework"], "seeds": [s["config"]["seed"] for s in summaries],
           "folders": [f"seed{s['config']['seed']}" for s in summaries],
           "epochs_completed": epochs, "device": first.get("device"),
           "perf": first.get("perf"), "params": first.get("params")}
    if epochs:
        out["final_eval_acc"] = mean_std([s["final_eval_acc"] for s in summaries])
        out["best_eval_acc"] = mean_std([s["best_eval_acc"] for s in summaries])
        out["mean_curves"] = {key: [statistics.fmean(h[e][key] for h in histories)
                                    for e in range(epochs)] for key in CURVE_KEYS}
        out["group_epoch_time_s"] = (sum(map(seed_epoch_time, summaries))
                                     if separate or first.get("sequential")
                                     else first["mean_epoch_time_s"])
        out["epoch_time_per_seed_s"] = out["group_epoch_time_s"] / len(summaries)
    return out


def write_group_summary(out_dir: Path, seeds: Sequence[int]) -> dict:
    """Rebuild a group's summary.json from its seeds' folders (the twin runs them one by one)."""
    summaries, histories = [], []
    for seed in seeds:
        folder = out_dir / f"seed{seed}"
        summaries.append(json.loads((folder / "summary.json").read_text()))
        histories.append([json.loads(line) for line in
                          (folder / "metrics.jsonl").read_text().splitlines() if line.strip()])
    group = group_summary(summaries, histories)
    write_json(out_dir / "summary.json", group)
    return group
