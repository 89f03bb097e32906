"""The epoch loop shared by both frameworks: train, evaluate, record, checkpoint, resume.

Nothing is lost on interruption: a checkpoint after every epoch (JAX path), Ctrl-C saves one
mid-epoch, outputs are written atomically, and `--resume` continues bit-for-bit (on CPU) where the
last checkpoint left off; metrics.jsonl is rebuilt from the checkpoint so every epoch is in it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxbench.config import Config, ConfigError

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class Interrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved (when the trainer supports it); the message says how to resume."""


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def params_digest(trainer, state) -> str:
    """sha256 over the final parameters' bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for leaf in trainer.param_leaves(state):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def summarize_history(history: list[dict]) -> dict:
    if not history:
        return {"epochs_completed": 0}
    steady = history[1:] or history
    best = max(history, key=lambda r: r["test_acc"])
    return {"epochs_completed": history[-1]["epoch"], "final_test_acc": history[-1]["test_acc"],
            "final_test_loss": history[-1]["test_loss"], "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in steady) / len(steady),
            "first_epoch_time_s": history[0]["epoch_time_s"]}


class _StopFlag:
    """First Ctrl-C asks the loop to stop between steps; a second one interrupts at once."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        print("\nCtrl-C: stopping after the current step and saving a checkpoint "
              "(Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
        self.event.set()

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self) -> bool:
        return self.event.is_set()


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


def fit(cfg: Config, trainer, out_dir: Path, framework: str = "jax",
        checkpoint_dir: Path | None = None, resume: bool = False, restart: bool = False,
        environment: dict | None = None, resume_hint: str = "", extra: dict | None = None) -> dict:
    """Train every epoch, evaluate after each, keep metrics.jsonl / summary.json / checkpoints."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    primary = framework != "jax" or jax.process_index() == 0
    ckpts = None
    if trainer.checkpointable:
        from jaxbench.checkpoint import Checkpoints

        ckpt_path = Path(checkpoint_dir or out_dir / "checkpoints")
        if restart and ckpt_path.exists():
            shutil.rmtree(ckpt_path)
        ckpts = Checkpoints(ckpt_path)
    elif resume:
        raise ConfigError(f"--resume: checkpoints exist for the JAX path only, not for {framework}.")

    state = trainer.init_state()
    compile_s = trainer.compile(state)
    sums, history, epoch, start = trainer.zero_sums(), [], 1, 0
    if ckpts is not None:
        latest = ckpts.latest_step()
        if resume:
            if latest is None:
                raise ConfigError(f"--resume: no checkpoint in {ckpts.directory}; run without "
                                  "--resume to start the experiment.")
            tree, progress = ckpts.restore(trainer.checkpoint_tree(state, sums))
            state, sums = tree["state"], tree["sums"]
            if progress["config"] != cfg.to_dict():
                diff = sorted(k for k in cfg.to_dict() if progress["config"].get(k) != cfg.to_dict()[k])
                raise ConfigError(f"--resume: the checkpoint in {ckpts.directory} was made with other "
                                  f"settings ({', '.join(diff)}); resume with the same flags, or "
                                  "pass --restart to discard it.")
            history, epoch, start = progress["history"], progress["epoch"], progress["step_in_epoch"]
            print(f"[{cfg.name}] resumed from {ckpts.directory} (step {latest}): epoch {epoch}, "
                  f"step {start} of {trainer.steps_per_epoch}", flush=True)
        elif latest is not None:
            raise ConfigError(f"{ckpts.directory} already holds checkpoints of an earlier run "
                              f"(latest step {latest}). Pass --resume to continue that run, or "
                              "--restart to discard them and start over.")

    print(f"[{cfg.name}] {framework}: {trainer.param_count(state):,} params, "
          f"{len(trainer.train):,} train / {len(trainer.test):,} eval images, "
          f"{trainer.steps_per_epoch} steps/epoch, compiled in {compile_s:.1f}s", flush=True)
    summary = {"experiment": cfg.name, "framework": framework,
               "params": trainer.param_count(state), "compile_time_s": compile_s,
               **(environment or environment_info(framework)),
               # What the JAX steps were compiled with (train.compile_lowered): shapes CPU speed.
               **({"xla_compiler_options": trainer.compiler_options}
                  if framework == "jax" else {}),
               "normalization": {"mean": trainer.mean.tolist(), "std": trainer.std.tolist()},
               "config": cfg.to_dict(), "train_examples": len(trainer.train),
               "eval_examples": len(trainer.test), **(extra or {})}

    def record() -> None:
        summary.update(summarize_history(history))
        if not primary:  # multi-host: process 0 alone writes the run's files
            return
        write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        write_json(out_dir / "summary.json", summary)

    def progress_record(next_epoch: int, step_in_epoch: int) -> dict:
        return {"epoch": next_epoch, "step_in_epoch": step_in_epoch, "history": history,
                "config": cfg.to_dict()}

    record()
    if epoch > cfg.epochs:
        print(f"[{cfg.name}] already finished: all {cfg.epochs} epochs are in {ckpts.directory}; "
              "nothing to do.", flush=True)
        summary["params_sha256"] = params_digest(trainer, state)
        record()
        ckpts.close()
        return summary

    images = trainer.steps_per_epoch * cfg.batch_size
    try:
        with _StopFlag() as stop:
            while epoch <= cfg.epochs:
                t0 = time.perf_counter()
                with tqdm(total=images, initial=start * cfg.batch_size, unit="img", leave=False,
                          desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr, disable=None) as bar:
                    state, sums, done = trainer.train_epoch(state, epoch, sums, start,
                                                            progress=bar.update, stop=stop)
                train_s = time.perf_counter() - t0
                if done < trainer.steps_per_epoch:
                    where = f"epoch {epoch}, step {done} of {trainer.steps_per_epoch}"
                    if ckpts is None:
                        raise Interrupted(f"interrupted at {where}; the {framework} path keeps no "
                                          "checkpoints, so a rerun starts over.")
                    ckpts.save(trainer.global_step(state), trainer.checkpoint_tree(state, sums),
                               progress_record(epoch, done), None)
                    ckpts.wait()
                    raise Interrupted(f"interrupted at {where}; checkpoint saved in "
                                      f"{ckpts.directory}. Resume with: {resume_hint}")
                tr = trainer.summarize(sums)
                ev = trainer.evaluate(state)
                row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
                       "test_loss": ev["loss"], "test_acc": ev["acc"], "epoch_time_s": train_s,
                       "eval_time_s": time.perf_counter() - t0 - train_s,
                       "images_per_s": (done - start) * cfg.batch_size / train_s,
                       "lr": trainer.lr(state)}
                if start:
                    row["resumed_at_step"] = start
                history.append(row)
                print(f"[{cfg.name}] epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f} "
                      f"acc {tr['acc']:.4f} | {cfg.eval_split} loss {ev['loss']:.4f} "
                      f"acc {ev['acc']:.4f} | {train_s:.1f}s ({row['images_per_s']:.0f} img/s) "
                      f"lr {row['lr']:.3g}", flush=True)
                if epoch == cfg.epochs:
                    summary["params_sha256"] = params_digest(trainer, state)
                record()
                epoch, start, sums = epoch + 1, 0, trainer.zero_sums()
                if ckpts is not None:
                    ckpts.save(trainer.global_step(state), trainer.checkpoint_tree(state, sums),
                               progress_record(epoch, 0), ev["acc"])
    finally:
        if ckpts is not None:
            ckpts.close()
    print(f"[{cfg.name}] done: {cfg.eval_split} acc {summary['final_test_acc']:.4f} "
          f"(best {summary['best_test_acc']:.4f} at epoch {summary['best_epoch']}); "
          f"wrote {out_dir}/metrics.jsonl and summary.json", flush=True)
    return summary
