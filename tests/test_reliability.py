"""Checkpoints, exact resume after SIGKILL, Ctrl-C, atomic outputs, divergence, bad input (more
in test_damage.py: damaged checkpoints, output paths, a full disk, the README's bad-input table)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import config, data, loop, outputs
from jaxbench.checkpoint import Checkpoints
from jaxbench.trainer import Trainer
from conftest import REPO, synthetic_split

KEYS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr")


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    # 640 images: 20 steps of 32 per epoch, ~1-2 s on 2 CPU cores, long enough to land a signal
    # inside an epoch.
    path = tmp_path_factory.mktemp("arrays") / "fmnist.npz"
    data.save_arrays(path, "fashion_mnist", synthetic_split(640), synthetic_split(100, seed=1))
    return path


def cli(*args):
    return [sys.executable, "-m", "jaxbench.run", *args]


def base_args(arrays, out, epochs=4):
    # XLA:CPU's compile pinned: under `auto` each process picks the fastest compile that passes
    # the self-check, and two processes (the reference and the killed run) on a busy machine can
    # pick different ones, whose float32 sums differ in the last bits.
    return ["--exp", "fmnist_baseline", "--arrays", str(arrays), "--epochs", str(epochs),
            "--out", str(out), "--xla-cpu", "default"]


def read(out, seed=None):
    run = out / "fmnist_baseline" / ("" if seed is None else f"seed{seed}")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [[r[k] for k in KEYS] for r in rows], json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(arrays, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = subprocess.run(cli(*base_args(arrays, out)), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return read(out)


def wait_for(proc, text, timeout=300):
    """Read the process's stdout until `text` (a regular expression) appears."""
    seen = ""
    deadline = time.time() + timeout
    while not re.search(text, seen):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"process ended before {text!r}: {seen}"
        seen += line
        assert time.time() < deadline
    return seen


def committed(out) -> bool:
    """Whether a checkpoint was committed: a kill can land before the first save completes
    (checkpoints are written in the background), and then there is nothing to resume."""
    folder = out / "fmnist_baseline" / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def test_checkpoints_keep_the_last_two_and_the_best(tmp_path):
    cfg = config.load("fmnist_baseline").replace(epochs=5, batch_size=32)
    trainer = Trainer(cfg, synthetic_split(320), synthetic_split(60, seed=1))
    loop.fit(cfg, trainer, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["epoch"] * trainer.steps_per_epoch for r in rows]
    best = steps[int(np.argmax([r["eval_acc"] for r in rows]))]
    kept = Checkpoints(tmp_path / "checkpoints").all_steps()
    assert sorted(kept) == sorted({steps[-1], steps[-2], best})


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(arrays, reference, tmp_path):
    """Killed at an arbitrary moment (twice), resumed: same metrics, same parameters.

    Slow: the default run covers SIGKILL + resume of a one-seed run in test_reproduce.py (a
    suite's run killed, rerun to the same metrics and parameter digest) and during an
    asynchronous save in test_damage.py, and Ctrl-C + resume of a seed group in test_damage.py."""
    ref_rows, ref_summary = reference
    random.seed(1234)
    for trial in range(2):
        proc = subprocess.Popen(cli(*base_args(arrays, tmp_path),
                                    *(["--resume"] if committed(tmp_path) else [])),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        # After the first epoch this process finishes (the resumed one may start at epoch 3):
        # somewhere inside the next epoch, or between two. An epoch here takes ~1.3-2 s.
        wait_for(proc, r"epoch \d/4")
        time.sleep(random.uniform(0.0, 1.0))
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resume = ["--resume"] if committed(tmp_path) else []
    res = subprocess.run(cli(*base_args(arrays, tmp_path), *resume), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout or not resume
    rows, summary = read(tmp_path)
    assert rows == ref_rows  # each epoch exactly once, identical numbers
    assert summary["params_sha256"] == ref_summary["params_sha256"]


@pytest.mark.slow
def test_a_killed_seed_group_resumes_bit_identically(arrays, tmp_path_factory, tmp_path):
    """--seeds 0,1 killed mid-run with SIGKILL, then resumed: every seed as if never stopped.

    Slow (three processes): the default run stops and resumes a group in-process
    (tests/test_damage.py, Ctrl-C after an epoch) and kills one-seed runs in subprocesses."""
    group = ["--seeds", "0,1", "--train-limit", "320"]  # 10 steps per seed and epoch
    ref = tmp_path_factory.mktemp("group-ref")
    done = subprocess.run(cli(*base_args(arrays, ref), *group), cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    random.seed(99)
    proc = subprocess.Popen(cli(*base_args(arrays, tmp_path), *group), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for(proc, r"epoch [12]/4")
    time.sleep(random.uniform(0.0, 1.0))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume = ["--resume"] if committed(tmp_path) else []
    res = subprocess.run(cli(*base_args(arrays, tmp_path), *group, *resume), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout or not resume
    for seed in (0, 1):
        rows, summary = read(tmp_path, seed)
        ref_rows, ref_summary = read(ref, seed)
        assert rows == ref_rows and summary["params_sha256"] == ref_summary["params_sha256"]
    assert read(tmp_path, 0)[0] != read(tmp_path, 1)[0]  # two different seeds


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(arrays, reference, tmp_path):
    ref_rows, ref_summary = reference
    proc = subprocess.Popen(cli(*base_args(arrays, tmp_path)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(proc, "epoch 1/4")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved in" in err and "--resume" in err and "Traceback" not in err
    res = subprocess.run(cli(*base_args(arrays, tmp_path), "--resume"), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows, summary = read(tmp_path)
    assert rows == ref_rows and summary["params_sha256"] == ref_summary["params_sha256"]
    # Seconds per epoch from whole epochs only: the resumed epoch timed just its last steps.
    history = [json.loads(l) for l in
               (tmp_path / "fmnist_baseline" / "metrics.jsonl").read_text().splitlines()]
    whole = [r["epoch_time_s"] for r in history[1:] if "resumed_at_step" not in r]
    assert summary["mean_epoch_time_s"] == pytest.approx(sum(whole) / len(whole))


def test_a_resumed_partial_epoch_is_left_out_of_the_seconds_per_epoch():
    row = {"eval_acc": 0.5, "eval_loss": 1.0}
    history = [{**row, "epoch": 1, "epoch_time_s": 9.0}, {**row, "epoch": 2, "epoch_time_s": 4.0},
               {**row, "epoch": 3, "epoch_time_s": 1.0, "resumed_at_step": 40},
               {**row, "epoch": 4, "epoch_time_s": 5.0}]
    summary = outputs.summarize_history(history)
    assert summary["mean_epoch_time_s"] == 4.5 and summary["first_epoch_time_s"] == 9.0
    # Nothing but the first epoch and a partial one: the first epoch's time, not the partial's.
    assert outputs.summarize_history(history[:1] + history[2:3])["mean_epoch_time_s"] == 9.0
    assert outputs.summarize_history(history[2:3])["mean_epoch_time_s"] == 1.0


def test_divergence_stops_with_exit_3_naming_epoch_and_step(arrays, tmp_path):
    exp = tmp_path / "wild.toml"
    exp.write_text((REPO / "experiments" / "fmnist_baseline.toml").read_text()
                   .replace("learning_rate = 1e-3", "learning_rate = 1e12")
                   .replace('optimizer = "adam"', 'optimizer = "sgd"'))
    res = subprocess.run(cli("--exp", str(exp), "--arrays", str(arrays), "--epochs", "2",
                             "--out", str(tmp_path)), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    assert "NaN or Inf at epoch 1, step" in res.stderr and "Traceback" not in res.stderr


def test_divergence_leaves_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    cfg = config.load("fmnist_baseline").replace(epochs=3, batch_size=32)
    trainer = Trainer(cfg, synthetic_split(320), synthetic_split(60, seed=1))
    original = trainer.train_epoch

    def poisoned(state, epoch, *args, **kwargs):  # epoch 2 starts from NaN weights
        if epoch == 2:
            state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return original(state, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    from jaxbench.loop import Diverged

    with pytest.raises(Diverged) as err:
        loop.fit(cfg, trainer, tmp_path)
    assert (err.value.epoch, err.value.step) == (2, 1)
    ckpts = Checkpoints(tmp_path / "checkpoints")
    assert ckpts.all_steps() == [trainer.steps_per_epoch]
    tree, progress = ckpts.restore(trainer.checkpoint_tree(trainer.init_state(), trainer.zero_sums()))
    assert progress["epoch"] == 2
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(tree["state"].params))


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    outputs.write_json(path, {"a": 1})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    expected = re.escape(f"writing {path} failed: OSError: disk full")
    with pytest.raises(outputs.OutputError, match=expected):
        outputs.write_json(path, {"a": 2, "b": "x" * 10_000})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert not path.with_name("summary.json.tmp").exists()  # and no half-written leftover


def test_manual_dir_that_is_a_file_or_empty_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for manual, message in ((tmp_path / "file", "not a folder"),
                            (tmp_path / "empty", "lacks train-images-idx3-ubyte.gz")):
        res = subprocess.run(cli("--exp", "fmnist_baseline", "--data-dir", str(tmp_path / "tfds"),
                                 "--manual-dir", str(manual)), cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
