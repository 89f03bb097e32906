"""The epoch loop shared by both frameworks: train, evaluate, record, checkpoint, resume.

Nothing is lost on interruption: a checkpoint after every epoch (JAX path), Ctrl-C saves one
mid-epoch, outputs are written atomically, and `--resume` continues bit-for-bit (on CPU) where the
last checkpoint left off; metrics.jsonl is rebuilt from the checkpoint so every epoch is in it once.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from jaxbench.config import Config, ConfigError
from jaxbench.outputs import Outputs, ensure_dir, params_digest

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class Interrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved (when the trainer supports it); the message says how to resume."""


class Diverged(RuntimeError):
    """A non-finite training loss; carries where it happened."""

    def __init__(self, epoch: int, step: int, seed: int | None = None):
        where = f" of seed {seed}" if seed is not None else ""
        super().__init__(f"the training loss{where} became NaN or Inf at epoch {epoch}, step "
                         f"{step} of that epoch")
        self.epoch, self.step, self.seed = epoch, step, seed


class Trainer(Protocol):
    """What `fit` and the benchmark need from a framework: `trainer.Trainer` (JAX) and
    `torch_twin.Trainer` implement it; the loop never asks which one it has."""

    cfg: Config
    seeds: tuple[int, ...]  # the seeds it trains: one, or a `--seeds` group
    grouped: bool  # a group: one folder per seed
    checkpointable: bool  # its state round-trips through orbax (resume works)
    steps_per_epoch: int
    train_size: int
    eval_size: int
    mean: np.ndarray  # the normalization constants, recorded in summary.json
    std: np.ndarray

    def init_state(self) -> Any: ...
    def compile(self, state: Any) -> float: ...  # seconds spent compiling, reported apart
    def zero_sums(self) -> Any: ...
    def train_epoch(self, state: Any, epoch: int, sums: Any = None, start: int = 0,
                    progress: Callable[[int], None] = ..., stop: Callable[[], bool] = ...
                    ) -> tuple[Any, Any, int]: ...  # raises Diverged
    def summarize(self, sums: Any) -> list[dict]: ...  # per seed: {"loss", "acc", "count"}
    def evaluate(self, state: Any) -> list[dict]: ...  # per seed
    def checkpoint_tree(self, state: Any, sums: Any) -> Any: ...
    def global_step(self, state: Any) -> int: ...
    def param_leaves(self, state: Any, member: int = 0) -> list[np.ndarray]: ...
    def param_count(self, state: Any) -> int: ...
    def lr(self, state: Any) -> float: ...
    def record(self) -> dict: ...  # framework-specific summary.json entries
    def adopt(self, progress: dict) -> None: ...  # a resumed run's recorded decisions


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


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint's JSON record holds besides the tensors."""

    histories: list[list[dict]]  # per seed, one row per finished epoch
    epoch: int = 1  # the next epoch to train
    step_in_epoch: int = 0  # steps of `epoch` already done

    def record(self, cfg: Config, trainer: Trainer) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "histories": self.histories, "seeds": list(trainer.seeds),
                "config": cfg.to_dict(), **trainer.record()}


def open_checkpoints(trainer: Trainer, out_dir: Path, checkpoint_dir: Path | None,
                     resume: bool, restart: bool):
    """The run's `Checkpoints`, or None for a trainer that keeps none.

    The folder must be usable (exit 2 naming the flag otherwise). `--restart` discards the
    checkpoints but keeps `damaged/`: damaged checkpoints are only ever removed by hand.
    """
    if not trainer.checkpointable:
        if resume:
            raise ConfigError("--resume: checkpoints exist for the JAX path only, not for the "
                              "PyTorch twin.")
        return None
    from jaxbench import distributed
    from jaxbench.checkpoint import DAMAGED, Checkpoints

    path = Path(checkpoint_dir or out_dir / "checkpoints")
    ensure_dir(path, "--checkpoint-dir" if checkpoint_dir else "--out")
    if restart and distributed.is_process0():  # several processes share it: process 0 clears
        for child in sorted(path.iterdir()):
            if child.name == DAMAGED:
                print(f"--restart: kept the damaged checkpoints in {child}", file=sys.stderr,
                      flush=True)
            elif child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if restart:
        distributed.barrier("restart")  # the others start once it is cleared
    return Checkpoints(path)


class NoIntactCheckpoint(ConfigError):
    """`--resume` found checkpoints, none of them usable: exit 2, nothing deleted."""


def restore_or_init(cfg: Config, trainer: Trainer, ckpts, resume: bool) -> tuple[Any, Any, Progress]:
    """A fresh state, or the newest intact checkpoint's when resuming; compiles the steps.

    Resuming tries the checkpoints newest first. One that is damaged (unreadable, truncated, or
    its digest differs from the one recorded at save time) is skipped with a warning naming its
    step and why, then moved to `<checkpoints>/damaged/` (kept, never deleted) once an older one
    restored; with none intact, `NoIntactCheckpoint` (exit 2) names the folder and `--restart`.
    """
    latest = ckpts.latest_step() if ckpts is not None else None
    if ckpts is not None and not resume and latest is not None:
        raise ConfigError(f"{ckpts.directory} already holds checkpoints of an earlier run "
                          f"(latest step {latest}). Pass --resume to continue that run, or "
                          "--restart to discard them and start over.")
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpts.directory}; run without --resume "
                          "to start the experiment.")
    if not resume:
        state = trainer.init_state()
        trainer.compile_time_s = trainer.compile(state)
        return state, trainer.zero_sums(), Progress([[] for _ in trainer.seeds])
    return _resume_intact(cfg, trainer, ckpts)


def _check_settings(cfg: Config, trainer: Trainer, ckpts, previous: dict) -> None:
    """A checkpoint resumes only the run that made it: same config, same seeds."""
    if previous["config"] != cfg.to_dict() or previous.get("seeds") != list(trainer.seeds):
        old = previous["config"] if isinstance(previous["config"], dict) else {}
        diff = sorted(k for k in cfg.to_dict() if old.get(k) != cfg.to_dict()[k])
        diff += ["seeds"] if previous.get("seeds") != list(trainer.seeds) else []
        raise ConfigError(f"--resume: the checkpoint in {ckpts.directory} was made with other "
                          f"settings ({', '.join(diff)}); resume with the same flags, or "
                          "pass --restart to discard it.")


def _resume_intact(cfg: Config, trainer: Trainer, ckpts) -> tuple[Any, Any, Progress]:
    from jaxbench.checkpoint import CheckpointDamaged

    skipped: list[CheckpointDamaged] = []
    # What the steps were compiled for: the perf record, and the step the epoch resumes at (its
    # tail's length); an older checkpoint after a damaged newer one may differ in either.
    compiled_for: tuple | None = None
    for step in sorted(ckpts.all_steps(), reverse=True):
        try:
            previous = ckpts.progress(step)
        except CheckpointDamaged as err:
            skipped.append(err)
            continue
        _check_settings(cfg, trainer, ckpts, previous)
        wanted = (previous.get("perf"), previous.get("step_in_epoch", 0))
        if compiled_for is None or compiled_for[0] != wanted[0]:
            trainer.adopt(previous)  # the interrupted run's speed decisions: the same program
            state = trainer.init_state()
            trainer.compile_time_s = trainer.compile(state)
        elif compiled_for[1] != wanted[1]:
            trainer.adopt(previous)
            trainer.compile_time_s += trainer.compile_tails(state)
        compiled_for = wanted
        sums = trainer.zero_sums()
        try:
            tree, previous = ckpts.restore(trainer.checkpoint_tree(state, sums), step)
        except CheckpointDamaged as err:
            skipped.append(err)
            continue
        break
    else:
        reasons = "; ".join(str(err) for err in skipped)
        raise NoIntactCheckpoint(
            f"--resume: no intact checkpoint in {ckpts.directory} ({reasons}). Nothing was "
            "deleted. Pass --restart to discard them and start over (this deletes them), or "
            "move the folder away to keep it.")
    for err in skipped:
        moved = ckpts.quarantine(err.step)
        print(f"warning: skipped {err}; moved it to {moved} (kept, not deleted); continuing "
              f"from the previous checkpoint, step {step}", file=sys.stderr, flush=True)
    state, sums = tree["state"], tree["sums"]
    progress = Progress(previous["histories"], previous["epoch"], previous["step_in_epoch"])
    print(f"[{cfg.name}] resumed from {ckpts.directory} (step {step}): epoch "
          f"{progress.epoch}, step {progress.step_in_epoch} of {trainer.steps_per_epoch}",
          flush=True)
    return state, sums, progress


def fit(cfg: Config, trainer: Trainer, out_dir: Path, framework: str = "jax",
        checkpoint_dir: Path | None = None, resume: bool = False, restart: bool = False,
        resume_hint: str = "", extra: dict | None = None) -> dict:
    """Train every epoch, evaluate after each, keep metrics.jsonl / summary.json / checkpoints."""
    ensure_dir(out_dir, "--out")
    ckpts = open_checkpoints(trainer, out_dir, checkpoint_dir, resume, restart)
    try:
        state, sums, progress = restore_or_init(cfg, trainer, ckpts, resume)
        outputs = Outputs(cfg, trainer, out_dir, framework, extra, state)
        print(f"[{cfg.name}] {framework}: {trainer.param_count(state):,} params, "
              f"{trainer.train_size:,} train / {trainer.eval_size:,} {cfg.eval_split} images, "
              f"{trainer.steps_per_epoch} steps/epoch, compiled in {trainer.compile_time_s:.1f}s",
              flush=True)
        if trainer.grouped:
            print(f"[{cfg.name}] seed group {list(trainer.seeds)} "
                  f"({trainer.perf.seed_group}): one folder per seed", flush=True)
        if "perf" in outputs.summary:
            print(f"[{cfg.name}] {trainer.perf.line()}", flush=True)
        elsewhere = {r["hardware"] for h in progress.histories for r in h
                     if r.get("hardware", outputs.hardware) != outputs.hardware}
        if elsewhere:
            print(f"warning: resuming on other hardware ({outputs.hardware}) than the epochs "
                  f"so far ({'; '.join(sorted(elsewhere))}): the run keeps its recorded speed "
                  "settings (the same program, the same numbers), and its seconds per epoch "
                  "count only the epochs trained here.", file=sys.stderr, flush=True)
        outputs.write(progress.histories)
        if progress.epoch > cfg.epochs:
            print(f"[{cfg.name}] already finished: all {cfg.epochs} epochs are in "
                  f"{ckpts.directory}; nothing to do.", flush=True)
            outputs.write(progress.histories, digests(trainer, state))
            return outputs.summary
        train_and_evaluate(cfg, trainer, state, sums, progress, ckpts, outputs, resume_hint)
    finally:
        if ckpts is not None:
            ckpts.close()
    for seed, s in zip(trainer.seeds, outputs.summaries):
        name = f"{cfg.name} seed {seed}" if trainer.grouped else cfg.name
        print(f"[{name}] done: {cfg.eval_split} acc {s['final_eval_acc']:.4f} (best "
              f"{s['best_eval_acc']:.4f} at epoch {s['best_epoch']})", flush=True)
    if outputs.primary:  # in a multi-process run, process 0 alone writes them
        print(f"[{cfg.name}] wrote metrics.jsonl and summary.json under {out_dir}", flush=True)
    return outputs.summary


def digests(trainer: Trainer, state: Any) -> list[dict]:
    return [{"params_sha256": params_digest(trainer, state, i)} for i in range(len(trainer.seeds))]


def train_and_evaluate(cfg: Config, trainer: Trainer, state: Any, sums: Any, progress: Progress,
                       ckpts, outputs: Outputs, resume_hint: str) -> None:
    """The epochs: train, evaluate, record, checkpoint; Ctrl-C saves a mid-epoch checkpoint."""
    from tqdm import tqdm

    images = trainer.steps_per_epoch * cfg.batch_size
    with _StopFlag() as stop:
        while progress.epoch <= cfg.epochs:
            epoch, start = progress.epoch, progress.step_in_epoch
            t0 = time.perf_counter()
            with tqdm(total=images, initial=start * cfg.batch_size, unit="img", leave=False,
                      desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr, disable=None) as bar:
                state, sums, done = trainer.train_epoch(state, epoch, sums, start,
                                                        progress=bar.update, stop=stop)
            train_s = time.perf_counter() - t0
            if done < trainer.steps_per_epoch:
                where = f"epoch {epoch}, step {done} of {trainer.steps_per_epoch}"
                if ckpts is None:
                    raise Interrupted(f"interrupted at {where}; this trainer keeps no "
                                      "checkpoints, so a rerun starts over.")
                progress.step_in_epoch = done
                ckpts.save(trainer.global_step(state), trainer.checkpoint_tree(state, sums),
                           progress.record(cfg, trainer), None)
                ckpts.wait()
                raise Interrupted(f"interrupted at {where}; checkpoint saved in "
                                  f"{ckpts.directory}. Resume with: {resume_hint}")
            evals = trainer.evaluate(state)
            eval_s = time.perf_counter() - t0 - train_s
            for seed, tr, ev, history in zip(trainer.seeds, trainer.summarize(sums), evals,
                                             progress.histories):
                row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
                       "eval_loss": ev["loss"], "eval_acc": ev["acc"], "epoch_time_s": train_s,
                       "eval_time_s": eval_s,
                       "images_per_s": (done - start) * cfg.batch_size / train_s,
                       "lr": trainer.lr(state)}
                if start:
                    row["resumed_at_step"] = start
                row["hardware"] = outputs.hardware
                history.append(row)
                name = f"{cfg.name} seed {seed}" if trainer.grouped else cfg.name
                print(f"[{name}] epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f} "
                      f"acc {tr['acc']:.4f} | {cfg.eval_split} loss {ev['loss']:.4f} "
                      f"acc {ev['acc']:.4f} | {train_s:.1f}s ({row['images_per_s']:.0f} img/s) "
                      f"lr {row['lr']:.3g}", flush=True)
            outputs.write(progress.histories,
                          digests(trainer, state) if epoch == cfg.epochs else None)
            progress.epoch, progress.step_in_epoch, sums = epoch + 1, 0, trainer.zero_sums()
            if ckpts is not None:  # "best" by the group's mean eval accuracy
                ckpts.save(trainer.global_step(state), trainer.checkpoint_tree(state, sums),
                           progress.record(cfg, trainer), float(np.mean([e["acc"] for e in evals])))
