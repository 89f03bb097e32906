"""Checkpoints with orbax: every epoch (asynchronously), the last 2 plus the best by eval accuracy.

A checkpoint holds everything an exact resume needs: the TrainState (params, batch_stats,
optimizer state, step), the metric sums of a partly done epoch, and a JSON record of progress
(epoch, steps done inside it, the metrics history, the config). The data order needs no state of
its own: it is a pure function of (seed, epoch), see `data.epoch_order`.

Integrity: the progress record of every checkpoint carries `integrity`, a sha256 over the saved
train pytree (each leaf's path, dtype, shape and bytes), computed from the very arrays handed to
orbax, and one over the rest of the record. `progress` and `restore` recompute them over what
they read back and raise `CheckpointDamaged` on any difference, so silent corruption is caught,
not only files that no longer parse. A damaged
checkpoint is never deleted or overwritten here: `quarantine` moves it to `<dir>/damaged/`.

A save that fails (a full disk, a refused permission), whether at once or later in orbax's
background thread, raises `OutputError` naming the checkpoint folder; the checkpoints committed
before it stay whole (orbax writes into a temporary folder and renames it when complete).

Test-only: `JAXBENCH_TEST_SAVE_DELAY_S=<seconds>` holds every save in flight that long after its
arrays are written and before orbax commits it, and prints `test: save of step N in flight` on
stderr, so a test can kill the process while an asynchronous save is unfinished. Never set it in
a real run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxbench.outputs import OutputError

SAVE_DELAY_ENV = "JAXBENCH_TEST_SAVE_DELAY_S"  # test-only, see the module docstring
DAMAGED = "damaged"  # the folder inside the checkpoint folder that damaged checkpoints move to
DIGEST = "sha256-leaves-v1"  # names how `tree_digest` hashes, stored with each digest
# tensorstore reports file-system failures as ValueErrors whose message starts with a status.
_IO_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAVAILABLE", "DATA_LOSS", "ABORTED",
                "NOT_FOUND", "INTERNAL", "UNKNOWN")


class CheckpointDamaged(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, or not what was saved."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step}: {reason}")
        self.step, self.reason = step, reason


def _leaf_bytes(leaf: Any) -> np.ndarray:
    """A leaf's value on this host (a replicated array's local copy works on every host)."""
    if isinstance(leaf, jax.Array):
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(np.asarray(leaf))


def tree_digest(tree: Any) -> dict:
    """sha256 over every leaf of `tree`: its path, dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    size = 0
    for path, leaf in leaves:
        a = _leaf_bytes(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
        size += a.nbytes
    return {"algorithm": DIGEST, "sha256": digest.hexdigest(), "leaves": len(leaves),
            "bytes": size}


def record_digest(record: dict) -> str:
    """sha256 of a JSON record, invariant under a JSON round trip (keys sorted)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:240]}" if text else type(err).__name__


def is_io_error(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a file-system failure rather than a program error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return True
        text = str(err)
        if isinstance(err, ValueError) and (text.startswith(_IO_STATUSES)
                                            or "os_error_code" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save or an unreadable file with whole tracebacks; this
    module reports each such failure itself, in one line, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_QUIET = _QuietOrbaxErrors()


class _DelayedSaveHandler(ocp.StandardCheckpointHandler):
    """Test-only (`JAXBENCH_TEST_SAVE_DELAY_S`): the save's commit waits before it completes, so
    the checkpoint stays in flight (written to orbax's temporary folder, not committed).

    The "in flight" line is printed from orbax's background thread once the arrays are written,
    not when `manager.save` returns: orbax creates the temporary folder asynchronously, so a kill
    right after `save` returned could land before any folder exists (seen on a loaded 2-core CI).
    """

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s
        self.step: int | None = None  # set by `Checkpoints.save`; one save is in flight at a time

    async def async_save(self, directory, *args, **kwargs):
        step = self.step
        futures = await super().async_save(directory, *args, **kwargs)
        from orbax.checkpoint._src.futures import future

        def hold() -> None:
            print(f"test: save of step {step} in flight for {self.delay_s:g}s "
                  f"({SAVE_DELAY_ENV})", file=sys.stderr, flush=True)
            time.sleep(self.delay_s)

        return [future.ChainedFuture(list(futures or []), hold)]


class Checkpoints:
    """A thin wrapper over `ocp.CheckpointManager` with this project's policy."""

    def __init__(self, directory: Path, keep_last: int = 2):
        self.directory = Path(directory).absolute()
        self.keep_last = keep_last
        self.save_delay_s = float(os.environ.get(SAVE_DELAY_ENV) or 0)
        logging.getLogger("absl").addFilter(_QUIET)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(self.keep_last),
            pp.BestN(get_metric_fn=lambda m: m["eval_acc"], reverse=False, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                               enable_async_checkpointing=True, create=True)
        if not self.save_delay_s:
            return ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("train", "progress"))
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        delayed = self._delayed = _DelayedSaveHandler(self.save_delay_s)
        registry.add("train", ocp.args.StandardSave, delayed)
        registry.add("train", ocp.args.StandardRestore, delayed)
        registry.add("progress", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
        registry.add("progress", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
        return ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _io(self, what: str, fn, *args, **kwargs):
        """Run a manager call; a file-system failure becomes `OutputError` naming the folder."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if is_io_error(err):
                raise OutputError(self.directory, err, what) from err
            raise

    def save(self, step: int, train: Any, progress: dict, eval_acc: float | None) -> None:
        """Start an asynchronous save; `wait` (or the next save) makes it durable.

        The progress record gets the train pytree's digest (`integrity`), taken from the arrays
        handed to orbax, before the save can change anything.
        """
        if step in self.manager.all_steps():
            # Ctrl-C right after an epoch's checkpoint asks for the same step again: the state
            # at a global step is the one already saved (and orbax refuses a step twice).
            return
        integrity = {**tree_digest(train), "record_sha256": record_digest(progress)}
        progress = {**progress, "integrity": integrity}
        if self.save_delay_s:
            self._delayed.step = step
        self._io("writing a checkpoint to", self.manager.save, step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(train), progress=ocp.args.JsonSave(progress)),
            metrics=None if eval_acc is None else {"eval_acc": eval_acc}, force=True)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure (and shardings) of `like`; returns (train pytree, progress).

        Raises `CheckpointDamaged` when the files cannot be read or what was read differs from
        the digest recorded at save time. A checkpoint saved before integrity records existed
        (no `integrity` key) is restored unverified.
        """
        step = self.latest_step() if step is None else step
        progress = self.progress(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                train=ocp.args.StandardRestore(abstract)))
            train = out["train"]
        except Exception as err:
            raise CheckpointDamaged(step, f"its arrays cannot be read "
                                    f"({_first_line(err)})") from err
        recorded = progress.get("integrity")
        if recorded is not None:
            if not isinstance(recorded, dict) or recorded.get("algorithm") != DIGEST:
                raise CheckpointDamaged(step, f"its integrity record is not one this version "
                                        f"writes ({str(recorded)[:120]})")
            found = tree_digest(train)
            if found["sha256"] != recorded.get("sha256"):
                saved = str(recorded.get("sha256"))[:12]
                raise CheckpointDamaged(
                    step, f"digest mismatch: the arrays read back ({found['leaves']} leaves, "
                    f"sha256 {found['sha256'][:12]}...) are not the ones saved "
                    f"({recorded.get('leaves')} leaves, sha256 {saved}...)")
        return train, progress

    def progress(self, step: int) -> dict:
        """The JSON progress record of checkpoint `step`, without reading its tensors.

        Raises `CheckpointDamaged` when it cannot be read or lacks what a resume needs.
        """
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                progress=ocp.args.JsonRestore()))
            record = out["progress"]
        except Exception as err:
            raise CheckpointDamaged(step, f"its progress record cannot be read "
                                    f"({_first_line(err)})") from err
        if not isinstance(record, dict):
            raise CheckpointDamaged(step, f"its progress record is not a JSON object "
                                    f"({type(record).__name__})")
        integrity = record.get("integrity")
        if isinstance(integrity, dict) and "record_sha256" in integrity:
            body = {k: v for k, v in record.items() if k != "integrity"}
            if record_digest(body) != integrity["record_sha256"]:
                raise CheckpointDamaged(step, "digest mismatch: its progress record is not the "
                                        "one saved")
        missing = [k for k in ("epoch", "step_in_epoch", "histories", "config") if k not in record]
        if missing:
            raise CheckpointDamaged(step, f"its progress record lacks {missing}")
        return record

    def quarantine(self, step: int) -> Path:
        """Move checkpoint `step` out of the manager's sight into `<dir>/damaged/` (kept whole,
        never deleted): later saves can neither overwrite it nor garbage-collect it."""
        source = self.directory / str(step)
        target = self.directory / DAMAGED / str(step)
        n = 1
        while target.exists():
            target = self.directory / DAMAGED / f"{step}-{n}"
            n += 1
        self.wait()
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(exist_ok=True)
                shutil.move(str(source), str(target))
            except OSError as err:  # left where it is, later saves could overwrite it: stop
                raise OutputError(source, err, "moving the damaged checkpoint") from err
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"jaxbench-quarantine-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self._io("writing a checkpoint to", self.manager.wait_until_finished)

    def close(self) -> None:
        """Finish pending saves and close. While another error is already on its way out, a
        failing save is reported on stderr instead, so the first error is the one shown."""
        pending = sys.exc_info()[1]
        try:
            self._io("writing a checkpoint to", self.manager.wait_until_finished)
        except Exception as err:
            if pending is None:
                self.manager.close()
                raise
            print(f"warning: {err}", file=sys.stderr, flush=True)
        self.manager.close()

