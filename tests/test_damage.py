"""Damaged paths: corrupted checkpoints, a kill during an asynchronous save, unusable output
folders, a full disk; and the README's bad-input table, each row of which is run here. Also
resuming a finished run, and a seed group stopped and resumed.

Runs go through `run.main` in this process (no interpreter start per case) on 320 synthetic
images, 10 steps per epoch, with `--xla-cpu default` so every run compiles the same program
without the timing-based self-check: numbers are compared bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxbench import checkpoint, data, outputs, run
from jaxbench.checkpoint import CheckpointDamaged, Checkpoints
from conftest import REPO, synthetic_split

EPOCHS, STEPS = 3, 10  # 320 train images, batch 32
KEYS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr")
EXP = "fmnist_baseline"


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "fmnist.npz"
    data.save_arrays(path, "fashion_mnist", synthetic_split(320), synthetic_split(64, seed=1))
    return path


def args(arrays, out, *extra, epochs=EPOCHS):
    return ["--exp", EXP, "--arrays", str(arrays), "--epochs", str(epochs), "--out", str(out),
            "--xla-cpu", "default", *extra]


def main(argv) -> tuple[int, str, str]:
    """`python -m jaxbench.run ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("JAXBENCH_COMPILE_CACHE")
    os.environ["JAXBENCH_COMPILE_CACHE"] = ""  # leave this process's JAX config alone
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run.main([str(a) for a in argv])
    finally:
        if old is None:
            os.environ.pop("JAXBENCH_COMPILE_CACHE")
        else:
            os.environ["JAXBENCH_COMPILE_CACHE"] = old
    return rc, out.getvalue(), err.getvalue()


def rows(run_dir: Path) -> list[list]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [[json.loads(line)[k] for k in KEYS] for line in lines]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def tree_hash(folder: Path) -> str:
    """One digest of every file's relative path and bytes under `folder`."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass
class Finished:
    out: Path  # the --out folder of a finished, uninterrupted run

    @property
    def run(self) -> Path:
        return self.out / EXP

    def copy(self, where: Path) -> Path:
        """A copy of the whole --out folder (outputs and checkpoints) under `where`."""
        shutil.copytree(self.out, where / "out")
        return where / "out"


@pytest.fixture(scope="module")
def finished(arrays, tmp_path_factory) -> Finished:
    out = tmp_path_factory.mktemp("finished")
    rc, _, err = main(args(arrays, out))
    assert rc == 0, err
    assert Checkpoints(out / EXP / "checkpoints").all_steps() == [2 * STEPS, 3 * STEPS]
    return Finished(out)


# --- Damage, the ways it happens ----------------------------------------------------------------

def garbage(step_dir: Path) -> None:
    """Every file overwritten with random bytes of its size (the reported case)."""
    rng = np.random.default_rng(0)
    for p in step_dir.rglob("*"):
        if p.is_file():
            p.write_bytes(rng.integers(0, 256, max(p.stat().st_size, 1), np.uint8).tobytes())


def truncated(step_dir: Path) -> None:
    """The array files cut in half (a copy or a disk that stopped part way)."""
    for p in (step_dir / "train").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def silent(step_dir: Path) -> None:
    """Well-formed files holding other numbers: one parameter changed by 1e-3, re-saved by
    orbax itself. Nothing fails to parse; only the digest can tell."""
    tree = ocp.StandardCheckpointer().restore(step_dir / "train")
    leaves, treedef = jax.tree.flatten(tree)
    first = next(i for i, x in enumerate(leaves) if np.asarray(x).dtype == np.float32
                 and np.asarray(x).size > 1)
    changed = np.array(leaves[first])
    changed.flat[0] += 1e-3
    leaves[first] = changed
    fresh = step_dir.parent / "resaved"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(fresh, jax.tree.unflatten(treedef, leaves))
    shutil.rmtree(step_dir / "train")
    shutil.move(str(fresh), str(step_dir / "train"))


def edited_record(step_dir: Path) -> None:
    """The JSON progress record edited into other, still valid, JSON."""
    path = step_dir / "progress" / "metadata"
    record = json.loads(path.read_text())
    record["epoch"] += 1
    path.write_text(json.dumps(record))


DAMAGE = {"garbage": (garbage, "its progress record cannot be read"),
          "truncated": (truncated, "its arrays cannot be read"),
          "silent": (silent, "digest mismatch: the arrays read back"),
          "edited-record": (edited_record, "digest mismatch: its progress record")}


# --- Checkpoints on their own: the integrity record ---------------------------------------------

@pytest.fixture
def small(tmp_path):
    """Three checkpoints of a small pytree; the manager keeps steps 2 and 3."""
    tree = {"w": jnp.arange(600.0).reshape(20, 30), "b": {"c": jnp.ones(7), "n": jnp.int32(3)}}
    ckpts = Checkpoints(tmp_path / "ck")
    for step in (1, 2, 3):
        ckpts.save(step, jax.tree.map(lambda x: x * step, tree),
                   {"epoch": step, "step_in_epoch": 0, "histories": [[]], "config": {}},
                   float(step))
    ckpts.close()
    return tmp_path / "ck", tree


def test_every_checkpoint_records_a_digest_that_restore_checks(small):
    folder, tree = small
    ckpts = Checkpoints(folder)
    restored, record = ckpts.restore(tree, 3)
    assert record["integrity"]["sha256"] == checkpoint.tree_digest(restored)["sha256"]
    assert record["integrity"]["leaves"] == 3
    np.testing.assert_array_equal(np.asarray(restored["w"]), 3 * np.arange(600.0).reshape(20, 30))
    ckpts.close()


@pytest.mark.parametrize("mode", list(DAMAGE))
def test_each_kind_of_damage_is_caught(small, mode):
    folder, tree = small
    damage, reason = DAMAGE[mode]
    damage(folder / "3")
    ckpts = Checkpoints(folder)
    with pytest.raises(CheckpointDamaged) as err:
        ckpts.restore(tree, 3)
    assert err.value.step == 3 and reason in str(err.value)
    ckpts.restore(tree, 2)  # the one before is untouched
    ckpts.close()


def test_a_checkpoint_without_a_record_restores_unverified(small):
    """Checkpoints written before integrity records existed still resume."""
    folder, tree = small
    path = folder / "3" / "progress" / "metadata"
    record = json.loads(path.read_text())
    del record["integrity"]
    path.write_text(json.dumps(record))
    ckpts = Checkpoints(folder)
    restored, _ = ckpts.restore(tree, 3)
    assert float(restored["b"]["c"][0]) == 3.0
    ckpts.close()


# --- Resume after damage: the previous checkpoint, then the uninterrupted run's numbers ---------

def test_falling_back_to_an_older_checkpoint_compiles_its_own_epoch_tail(monkeypatch):
    """The newest checkpoint ends an epoch, the older one was saved mid-epoch (Ctrl-C at step 3
    of 20, then resumed): falling back to it compiles the 1-step call that finishes its epoch
    (17 steps in calls of 4), so no compile lands inside a timed epoch. Which calls get compiled
    is the point, so XLA's compile itself is skipped (lowering still traces each call)."""
    from jaxbench import config, loop, perf
    from jaxbench.trainer import Trainer

    monkeypatch.setattr(perf, "compile_lowered", lambda lowered, options: (None, options))
    cfg = config.load("fmnist_baseline").replace(epochs=2, batch_size=16, steps_per_call=4,
                                                 xla_cpu="default", image_size=16)
    trainer = Trainer(cfg, synthetic_split(320), synthetic_split(16, seed=1))
    records = {40: loop.Progress([[]], 3, 0).record(cfg, trainer),
               23: loop.Progress([[]], 2, 3).record(cfg, trainer)}

    class Older:  # the checkpoints: step 40 turns out damaged when its arrays are read
        directory = Path("checkpoints")
        all_steps = staticmethod(lambda: sorted(records))
        progress = staticmethod(lambda step: records[step])
        quarantine = staticmethod(lambda step: f"damaged/{step}")

        @staticmethod
        def restore(tree, step):
            if step == 40:
                raise CheckpointDamaged(step, "its arrays' digest differs")
            return tree, records[step]

    _, _, progress = loop._resume_intact(cfg, trainer, Older())
    assert (progress.epoch, progress.step_in_epoch) == (2, 3)
    assert sorted(trainer.train_fns) == [1, 4]  # epoch: 5 calls of 4; its rest: 4 x 4 + 1


@pytest.mark.parametrize("mode", ["garbage", "truncated", "silent"])
def test_resume_skips_a_damaged_newest_checkpoint(arrays, finished, tmp_path, mode):
    damage, reason = DAMAGE[mode]
    out = finished.copy(tmp_path)
    newest = out / EXP / "checkpoints" / str(3 * STEPS)
    damage(newest)
    before = tree_hash(newest)
    rc, stdout, err = main(args(arrays, out, "--resume"))
    assert rc == 0, err
    assert f"warning: skipped checkpoint step {3 * STEPS}: {reason}" in err
    assert f"resumed from {out / EXP / 'checkpoints'} (step {2 * STEPS})" in stdout
    # the damaged checkpoint is kept, byte for byte, out of the manager's way
    kept = out / EXP / "checkpoints" / "damaged" / str(3 * STEPS)
    assert tree_hash(kept) == before
    assert rows(out / EXP) == rows(finished.run)
    assert summary(out / EXP)["params_sha256"] == summary(finished.run)["params_sha256"]
    # the re-done epoch's checkpoint is a whole one again
    assert Checkpoints(out / EXP / "checkpoints").all_steps() == [2 * STEPS, 3 * STEPS]


def test_restart_keeps_damaged_checkpoints(arrays, finished, tmp_path):
    out = finished.copy(tmp_path)
    damaged = out / EXP / "checkpoints" / "damaged" / "7"
    damaged.mkdir(parents=True)
    (damaged / "file").write_text("kept")
    rc, _, err = main(args(arrays, out, "--restart", epochs=1))
    assert rc == 0, err
    assert (damaged / "file").read_text() == "kept" and "kept the damaged checkpoints" in err


def test_resuming_a_finished_run_says_so_and_restart_starts_over(arrays, tmp_path):
    run_args = args(arrays, tmp_path, epochs=1)
    assert main(run_args)[0] == 0
    rc, stdout, err = main([*run_args, "--resume"])
    assert rc == 0 and "already finished" in stdout, err
    rc, stdout, err = main([*run_args, "--restart"])
    assert rc == 0 and "resumed from" not in stdout and "epoch 1/1" in stdout, err


# --- A kill while an asynchronous save is in flight ---------------------------------------------

def test_kill_during_an_asynchronous_save_then_resume(arrays, finished, tmp_path):
    """JAXBENCH_TEST_SAVE_DELAY_S (test-only) holds every save uncommitted for 3 s after its
    arrays are written. The process is killed once the save of epoch 2 is in flight (the save of
    epoch 1 had to complete first); --resume restores epoch 1's and ends as if never stopped."""
    out = tmp_path / "out"
    env = dict(os.environ, JAXBENCH_TEST_SAVE_DELAY_S="3")
    proc = subprocess.Popen([sys.executable, "-m", "jaxbench.run", *args(arrays, out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = "", time.time() + 300
    try:
        while f"test: save of step {2 * STEPS} in flight" not in seen:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"the run ended first: {seen}"
            assert time.time() < deadline, seen
            seen += line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = out / EXP / "checkpoints"
    assert Checkpoints(folder).all_steps() == [STEPS]  # the committed one only
    assert any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir()), \
        "no unfinished save was left: the kill did not land inside it"
    rc, stdout, err = main(args(arrays, out, "--resume"))
    assert rc == 0, err
    assert f"(step {STEPS}): epoch 2, step 0" in stdout
    assert rows(out / EXP) == rows(finished.run)
    assert summary(out / EXP)["params_sha256"] == summary(finished.run)["params_sha256"]


def interrupt_after_epoch_1(monkeypatch) -> None:
    """SIGINT right after epoch 1's outputs are written, as a Ctrl-C would arrive (`Outputs.write`
    runs once at the start, then after every epoch); `monkeypatch.undo()` ends it."""
    calls, original = [], outputs.Outputs.write

    def write(self, histories, finals=None):
        original(self, histories, finals)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(outputs.Outputs, "write", write)


def test_a_seed_group_stopped_by_ctrl_c_resumes_every_seed(arrays, tmp_path, monkeypatch):
    """--seeds 0,1 (looped on CPU: a list of states in one checkpoint): Ctrl-C right after epoch
    1, then --resume, and each seed ends as its uninterrupted group run did. (With SIGKILL at a
    random moment instead, in a subprocess: tests/test_reliability.py, -m slow.)"""
    group = ("--seeds", "0,1")
    ref = tmp_path / "ref"
    rc, _, err = main(args(arrays, ref, *group, epochs=2))
    assert rc == 0, err
    interrupt_after_epoch_1(monkeypatch)
    out = tmp_path / "out"
    rc, _, err = main(args(arrays, out, *group, epochs=2))
    monkeypatch.undo()
    assert rc == 130 and "--resume" in err, err
    rc, stdout, err = main(args(arrays, out, *group, "--resume", epochs=2))
    assert rc == 0 and "resumed from" in stdout, err
    for seed in ("seed0", "seed1"):
        assert [r[0] for r in rows(out / EXP / seed)] == [1, 2]
        assert rows(out / EXP / seed) == rows(ref / EXP / seed)
        assert summary(out / EXP / seed)["params_sha256"] == summary(ref / EXP / seed)["params_sha256"]
    assert rows(out / EXP / "seed0") != rows(out / EXP / "seed1")


# --- The bad-input table: each row run, its exit code, message and what it keeps ----------------

@dataclasses.dataclass
class Ctx:
    arrays: Path
    finished: Finished
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


@dataclasses.dataclass(frozen=True)
class Row:
    done: str  # what was done
    code: int  # the exit code
    message: str  # an excerpt of the message on stderr; … stands for a path or a detail
    kept: str  # what is kept
    scenario: Callable[[Ctx], tuple[int, str]]  # runs it, checks what is kept: (code, stderr)

    def line(self) -> str:
        return f"| {self.done} | {self.code} | `{self.message}` | {self.kept} |"


def no_experiment(c: Ctx):
    rc, _, err = main(["--exp", "nope", "--out", c.tmp / "out"])
    assert not (c.tmp / "out").exists()
    return rc, err


def mistyped_value(c: Ctx):
    path = c.tmp / "fast.toml"
    path.write_text((REPO / "experiments" / f"{EXP}.toml").read_text()
                    .replace("learning_rate = 1e-3", 'learning_rate = "fast"'))
    rc, _, err = main(["--exp", path, "--arrays", c.arrays, "--out", c.tmp / "out"])
    assert not (c.tmp / "out").exists()
    return rc, err


def unknown_key(c: Ctx):
    path = c.tmp / "typo.toml"
    path.write_text((REPO / "experiments" / f"{EXP}.toml").read_text() + "learning_rte = 0.1\n")
    rc, _, err = main(["--exp", path, "--arrays", c.arrays, "--out", c.tmp / "out"])
    assert not (c.tmp / "out").exists()
    return rc, err


def out_is_a_file(c: Ctx):
    file = c.tmp / "some_file"
    file.write_text("mine")
    rc, _, err = main(args(c.arrays, file))
    assert file.read_text() == "mine"
    return rc, err


def out_cannot_be_created(c: Ctx):
    if not sys.platform.startswith("linux"):
        pytest.skip("uses /proc, where no folder can be made")
    return main(args(c.arrays, "/proc/jaxbench-test/out"))[::2]


def checkpoint_dir_is_a_file(c: Ctx):
    file = c.tmp / "ckpt_file"
    file.write_text("mine")
    rc, _, err = main(args(c.arrays, c.tmp / "out", "--checkpoint-dir", file))
    assert file.read_text() == "mine"
    assert not list((c.tmp / "out").rglob("*.json*"))
    return rc, err


def run_dir_is_a_file(c: Ctx):
    file = c.tmp / "run_file"
    file.write_text("mine")
    rc, _, err = main(args(c.arrays, c.tmp / "out", "--run-dir", file))
    assert file.read_text() == "mine"
    assert not (c.tmp / "out").exists()
    return rc, err


def resume_without_checkpoint(c: Ctx):
    rc, _, err = main(args(c.arrays, c.tmp / "out", "--resume"))
    assert not [p for p in (c.tmp / "out").rglob("*") if p.is_file()]
    return rc, err


def checkpoints_exist(c: Ctx):
    out = c.finished.copy(c.tmp)
    before = tree_hash(out)
    rc, _, err = main(args(c.arrays, out))
    assert tree_hash(out) == before
    return rc, err


def other_settings(c: Ctx):
    out = c.finished.copy(c.tmp)
    before = tree_hash(out)
    rc, _, err = main(args(c.arrays, out, "--resume", epochs=EPOCHS + 1))
    assert tree_hash(out) == before
    return rc, err


def newest_damaged(c: Ctx):
    out = c.finished.copy(c.tmp)
    garbage(out / EXP / "checkpoints" / str(3 * STEPS))
    rc, _, err = main(args(c.arrays, out, "--resume"))
    assert (out / EXP / "checkpoints" / "damaged" / str(3 * STEPS)).is_dir()
    assert rows(out / EXP) == rows(c.finished.run)
    return rc, err


def none_intact(c: Ctx):
    out = c.finished.copy(c.tmp)
    folder = out / EXP / "checkpoints"
    garbage(folder / str(3 * STEPS))
    truncated(folder / str(2 * STEPS))
    before = tree_hash(out)
    rc, _, err = main(args(c.arrays, out, "--resume"))
    assert tree_hash(out) == before  # nothing moved, deleted or rewritten
    assert str(folder) in err
    return rc, err


def disk_full_writing_metrics(c: Ctx):
    """A real ENOSPC from the kernel: metrics.jsonl's temporary file is made a link to
    /dev/full just before the write after epoch 2."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    out = c.tmp / "out"
    calls = []
    original = outputs.Outputs.write

    def write(self, histories, finals=None):
        calls.append(1)
        if len(calls) == 3:  # 1: before training, 2: after epoch 1, 3: after epoch 2
            os.symlink("/dev/full", out / EXP / "metrics.jsonl.tmp")
        return original(self, histories, finals)

    c.monkeypatch.setattr(outputs.Outputs, "write", write)
    rc, _, err = main(args(c.arrays, out))
    c.monkeypatch.undo()
    assert not (out / EXP / "metrics.jsonl.tmp").exists()
    assert [r[0] for r in rows(out / EXP)] == [1]  # whole JSON lines, the last finished epoch
    assert summary(out / EXP)["epochs_completed"] == 1
    assert Checkpoints(out / EXP / "checkpoints").all_steps() == [STEPS]
    rc2, _, err2 = main(args(c.arrays, out, "--resume"))  # space is back: continue
    assert rc2 == 0, err2
    assert rows(out / EXP) == rows(c.finished.run)
    return rc, err


def disk_full_writing_a_checkpoint(c: Ctx):
    """The save of epoch 2 fails in orbax's background thread, as a full disk makes it fail;
    the failure surfaces at the next save."""
    from orbax.checkpoint._src.futures import future

    original = ocp.StandardCheckpointHandler.async_save
    saves = []

    async def async_save(self, directory, *a, **k):
        futures = await original(self, directory, *a, **k)
        saves.append(directory)
        if len(saves) != 2:
            return futures

        def fail():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return [future.ChainedFuture(list(futures or []), fail)]

    c.monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
    out = c.tmp / "out"
    rc, _, err = main(args(c.arrays, out))
    c.monkeypatch.undo()
    assert Checkpoints(out / EXP / "checkpoints").all_steps() == [STEPS]
    # epoch 2's failed save surfaces at epoch 3's, after epoch 3's outputs: all whole JSON
    assert [r[0] for r in rows(out / EXP)] == [1, 2, 3]
    assert summary(out / EXP)["epochs_completed"] == 3
    return rc, err


def diverged(c: Ctx):
    from jaxbench.trainer import Trainer

    original = Trainer.train_epoch

    def poisoned(self, state, epoch, *a, **k):  # epoch 2 starts from NaN weights
        if epoch == 2:
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return original(self, state, epoch, *a, **k)

    c.monkeypatch.setattr(Trainer, "train_epoch", poisoned)
    out = c.tmp / "out"
    rc, _, err = main(args(c.arrays, out))
    c.monkeypatch.undo()
    assert Checkpoints(out / EXP / "checkpoints").all_steps() == [STEPS]
    assert [r[0] for r in rows(out / EXP)] == [1]
    return rc, err


def ctrl_c(c: Ctx):
    """SIGINT arrives right after epoch 1's outputs are written, as a Ctrl-C would. The resume
    runs on "another machine": the same numbers, a warning, every metrics row naming its
    hardware, and the seconds per epoch from this machine's epochs alone."""
    out = c.tmp / "out"
    interrupt_after_epoch_1(c.monkeypatch)
    rc, _, err = main(args(c.arrays, out))
    c.monkeypatch.undo()
    c.monkeypatch.setattr(outputs, "hardware_of", lambda device: "another machine")
    rc2, _, err2 = main(args(c.arrays, out, "--resume"))
    c.monkeypatch.undo()
    assert rc2 == 0, err2
    assert rows(out / EXP) == rows(c.finished.run)
    assert "warning: resuming on other hardware (another machine) than the epochs so far" in err2
    history = [json.loads(line) for line in (out / EXP / "metrics.jsonl").read_text().splitlines()]
    assert [r["hardware"] == "another machine" for r in history] == [False, True, True]
    done = summary(out / EXP)  # epoch 2 warms this machine up: epoch 3 is its steady one
    assert done["mean_epoch_time_s"] == history[2]["epoch_time_s"]
    assert done["epochs_timed_here"] == 2 and done["first_epoch_time_s"] == history[0]["epoch_time_s"]
    return rc, err


def bad_arrays(c: Ctx):
    lone = c.tmp / "x.npy"  # one array, not the archive of splits `jaxbench.data export` writes
    np.save(lone, np.zeros(3))
    rc, _, err = main(["--exp", EXP, "--arrays", lone, "--out", c.tmp / "out"])
    assert rc == 2 and "a single array (.npy), not an .npz archive" in err, err
    bad = c.tmp / "x.npz"
    bad.write_bytes(b"not an npz")
    rc, _, err = main(["--exp", EXP, "--arrays", bad, "--out", c.tmp / "out"])
    assert not (c.tmp / "out").exists()
    return rc, err


ROWS = [
    Row("`--exp` names no experiment", 2, "unknown experiment 'nope' (--exp)",
        "nothing is written", no_experiment),
    Row('a value of the wrong type or range in the experiment\'s TOML (`learning_rate = "fast"`, '
        "`momentum = 1.5`, `batch_size = true`, an unknown dataset or split...)", 2,
        '…toml: learning_rate = "fast": expected a number > 0 (e.g. 1e-3)',
        "nothing is written", mistyped_value),
    Row("a key the experiment's TOML does not know", 2, "…toml: unknown keys ['learning_rte']",
        "nothing is written", unknown_key),
    Row("`--out` is a file (or a file sits where a folder must be made)", 2,
        "--out: cannot create …: … is a file, not a folder", "the file, untouched",
        out_is_a_file),
    Row("`--out` cannot be created or written (no permission, a read-only disk)", 2,
        "--out: cannot create or write the folder …", "nothing is written",
        out_cannot_be_created),
    Row("`--checkpoint-dir` is a file", 2, "--checkpoint-dir: … is a file, not a folder",
        "the file, untouched; no output is written", checkpoint_dir_is_a_file),
    Row("`--run-dir` is a file", 2, "--run-dir: … is a file, not a folder", "the file, untouched",
        run_dir_is_a_file),
    Row("`--resume` without a checkpoint", 2,
        "--resume: no checkpoint in …; run without --resume", "no file is written",
        resume_without_checkpoint),
    Row("a new run where an earlier run's checkpoints are (neither `--resume` nor `--restart`)",
        2, "… already holds checkpoints of an earlier run", "the earlier run, untouched",
        checkpoints_exist),
    Row("`--resume` with other settings than the checkpoint's", 2,
        "--resume: the checkpoint in … was made with other settings (epochs)",
        "the earlier run, untouched", other_settings),
    Row("`--resume` when the newest checkpoint is damaged (unreadable, truncated, or its digest "
        "differs from the one recorded at save time)", 0,
        "warning: skipped checkpoint step …: …; moved it to …/damaged/…",
        "the damaged checkpoint, moved to `checkpoints/damaged/<step>`; the run continues from "
        "the previous checkpoint and ends with the uninterrupted run's metrics", newest_damaged),
    Row("`--resume` when no checkpoint is intact", 2,
        "--resume: no intact checkpoint in … Nothing was deleted. Pass --restart",
        "every checkpoint, as it was", none_intact),
    Row("the disk fills up (or a permission is lost) while metrics.jsonl or summary.json is "
        "written", 4, "writing …metrics.jsonl failed: No space left on device (ENOSPC)",
        "metrics.jsonl and summary.json of the last finished epoch, whole; the checkpoints "
        "committed; `--resume` continues", disk_full_writing_metrics),
    Row("the disk fills up while a checkpoint is written (in the background)", 4,
        "writing a checkpoint to … failed: No space left on device (ENOSPC)",
        "the checkpoints committed before; metrics.jsonl and summary.json, whole",
        disk_full_writing_a_checkpoint),
    Row("the training loss becomes NaN or Inf", 3,
        "the training loss became NaN or Inf at epoch 2, step …", "the last good checkpoint",
        diverged),
    Row("Ctrl-C", 130, "interrupted at epoch …; checkpoint saved in …. Resume with: …",
        "a checkpoint of the step reached; `--resume` continues", ctrl_c),
    Row("`--arrays` is not an array file (garbage, or a lone `.npy` array)", 2, "--arrays …: not an array file",
        "nothing is written", bad_arrays),
]
BEGIN, END = "<!-- bad-input-table -->", "<!-- /bad-input-table -->"


def table() -> str:
    head = ["| what was done | exit | message (excerpt; … is a path or a detail) "
            "| what is kept |", "|---|---:|---|---|"]
    return "\n".join([BEGIN, *head, *(row.line() for row in ROWS), END])


def test_the_readme_bad_input_table_is_this_one():
    """README.md's table between the markers is `table()`: a row changed here or there fails."""
    text = (REPO / "README.md").read_text()
    assert BEGIN in text and END in text, f"README.md lacks the bad-input table:\n{table()}"
    found = text[text.index(BEGIN): text.index(END) + len(END)]
    assert found == table(), f"README.md's bad-input table is out of date; make it:\n{table()}"


@pytest.mark.parametrize("row", ROWS, ids=[r.scenario.__name__ for r in ROWS])
def test_each_row_of_the_bad_input_table(row, arrays, finished, tmp_path, monkeypatch):
    code, err = row.scenario(Ctx(arrays, finished, tmp_path, monkeypatch))
    assert code == row.code, err
    pattern = ".*?".join(re.escape(part) for part in row.message.split("…"))
    assert re.search(pattern, err), f"{row.message!r} not in:\n{err}"
    assert "Traceback" not in err
    if code:  # the error itself is one line, the last one
        assert err.strip().splitlines()[-1].startswith("error: ") or code == 130, err
