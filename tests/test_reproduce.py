"""python -m jaxbench.reproduce: the plan, filters, early data errors, and kill -9 + rerun giving
the numbers of an uninterrupted suite. Synthetic arrays only: no real data needed."""

import json
import signal
import subprocess
import sys
import time

import pytest

from jaxbench import config, data, reproduce, run
from jaxbench.children import LOCK
from jaxbench.plan import new_jobs, plan_experiment
from jaxbench.suite import SuiteError, checkpoint_dir, has_checkpoint, load_suite, seed_folder
from conftest import REPO, synthetic_split

KEYS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr")


@pytest.fixture(scope="module")
def fixture_suite(tmp_path_factory):
    """A one-experiment suite with two seeds on synthetic Fashion-MNIST arrays (6 steps/epoch)."""
    root = tmp_path_factory.mktemp("suite")
    data.save_arrays(root / "f.npz", "fashion_mnist", synthetic_split(192),
                     synthetic_split(64, seed=1))
    data.save_arrays(root / "t.npz", "tiny_imagenet", synthetic_split(64, (64, 64, 3), 200),
                     synthetic_split(32, (64, 64, 3), 200, seed=1))
    (root / "suite.toml").write_text('description = "fixture"\nexperiments = ["fmnist_baseline"]\n'
                                     "seeds = [0, 1]\n")
    return root


def suite_args(root, out, *extra):
    # XLA's default compile: skips the speed self-check, which only costs the test time here.
    return ["--suite", str(root / "suite.toml"), "--fmnist-arrays", str(root / "f.npz"),
            "--epochs", "3", "--out", str(out), "--xla-cpu", "default",
            "--grouping", "sequential", *extra]


def cli(*args):
    return [sys.executable, "-m", "jaxbench.reproduce", *args]


def read(runs, exp, seed):
    """One seed's metrics and parameter digest from `runs` (a suite's <out>/runs, or --out)."""
    folder = runs / exp / f"seed{seed}"
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    return [[r[k] for k in KEYS] for r in rows], summary["params_sha256"]


def test_a_suite_is_not_an_experiment():
    assert (config.experiments_dir() / "suites" / "paper.toml").is_file()
    listed = [line.split()[0] for line in run.list_experiments().splitlines()]
    assert "paper" not in config.available() and "paper" not in listed and "suites" not in listed
    suite = load_suite("paper")
    assert suite.experiments == ("fmnist_baseline", "tiny_baseline", "fmnist_target", "tiny_target")
    assert suite.seeds == (0, 1, 2) and suite.optional == {"densenet": ("fmnist_densenet", "tiny_densenet")}


def plan_rows(capsys, *args):
    code = reproduce.main(["--dry-run", "--no-estimate", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("----")) + 1
    last = lines.index("", first)
    return list(dict.fromkeys(line.split()[0] for line in lines[first:last])), out


def test_dry_run_prints_the_plan_and_filters(capsys, tmp_path):
    out = tmp_path / "never-made"
    rows, text = plan_rows(capsys, "--out", str(out))
    assert rows == ["fmnist_baseline", "tiny_baseline", "fmnist_target", "tiny_target"]
    assert "seeds 0,1,2" in text and "25" in text
    rows, _ = plan_rows(capsys, "--out", str(out), "--include-densenet")
    assert rows[-2:] == ["fmnist_densenet", "tiny_densenet"]
    rows, _ = plan_rows(capsys, "--out", str(out), "--only", "tiny_target,fmnist_target")
    assert rows == ["fmnist_target", "tiny_target"]  # suite order, not the flag's
    rows, _ = plan_rows(capsys, "--out", str(out), "--skip", "tiny_target", "--skip", "tiny_baseline")
    assert rows == ["fmnist_baseline", "fmnist_target"]
    rows, text = plan_rows(capsys, "--out", str(out), "--only", "fmnist_densenet", "--epochs", "2",
                           "--seeds", "0,1")
    assert rows == ["fmnist_densenet"] and "epochs: 2 (--epochs)" in text and "seeds 0,1" in text
    _, text = plan_rows(capsys, "--out", str(out), "--fmnist-dir", str(tmp_path / "typo"))
    assert f"--fmnist-dir {tmp_path / 'typo'} -- NOT FOUND" in text
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, words", [
    (["--only", "nope"], ["--only", "nope", "fmnist_baseline"]),
    (["--skip", "fmnist_baseline,nope"], ["--skip", "nope"]),
    (["--suite", "nope"], ["unknown suite", "paper"]),
    (["--fmnist-dir", "a", "--fmnist-arrays", "b"], ["--fmnist-dir", "--fmnist-arrays"]),
])
def test_bad_flags_exit_2_with_one_message(args, words, capsys, tmp_path):
    assert reproduce.main(["--dry-run", "--no-estimate", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words) and "Traceback" not in err


def test_missing_data_fails_before_any_training(fixture_suite, tmp_path, capsys):
    """Both datasets bad: one message naming each, exit 2, no run folder."""
    out = tmp_path / "out"
    code = reproduce.main(["--only", "fmnist_baseline,tiny_baseline", "--out", str(out),
                           "--fmnist-dir", str(tmp_path / "no-such-folder"),
                           "--data-dir", str(tmp_path / "tfds"),
                           "--tiny-arrays", str(fixture_suite / "f.npz"), "--no-estimate"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing was trained" in err and "Traceback" not in err
    assert "fashion_mnist (for fmnist_baseline)" in err and "no-such-folder" in err
    assert "tiny_imagenet (for tiny_baseline)" in err and "holds fashion_mnist" in err
    assert not (out / "runs").exists() and not (out / "provenance.json").exists()


def test_an_unfinished_group_resumes_as_the_group_it_was(tmp_path):
    """Planning from the folder alone: finished seeds skipped; a group's checkpoint resumes that
    group, even when one of its seeds already wrote its last epoch; other seeds start anew."""
    cfg = config.load("fmnist_baseline").replace(epochs=3)
    for seed, done in ((0, 3), (1, 2), (3, 3)):
        folder = seed_folder(tmp_path, cfg.name, seed)
        folder.mkdir(parents=True)
        summary = {"config": cfg.replace(seed=seed).to_dict(), "epochs_completed": done}
        (folder / "summary.json").write_text(json.dumps(summary | ({"params_sha256": "x"} if done == 3 else {})))
    (checkpoint_dir(tmp_path, cfg.name, (0, 1), "group") / "12").mkdir(parents=True)
    (checkpoint_dir(tmp_path, cfg.name, (3,), "single") / "9").mkdir(parents=True)
    jobs, todo, states = plan_experiment(tmp_path, "fmnist_baseline", cfg, [0, 1, 2, 3])
    assert [(j.seeds, j.mode, j.resume, j.epochs_done) for j in jobs] == [((0, 1), "group", True, 2)]
    assert todo == [2] and [s.finished for s in states] == [True, False, False, True]
    new = new_jobs("fmnist_baseline", cfg, todo, "group", tmp_path, {s.seed: s for s in states})
    assert [(j.seeds, j.mode, j.resume) for j in new] == [((2,), "single", False)]
    # Another protocol in the same folder is refused before anything runs.
    with pytest.raises(SuiteError, match="epochs 3 there, 4 here"):
        plan_experiment(tmp_path, "fmnist_baseline", cfg.replace(epochs=4), [0])


def test_auto_grouping_groups_seeds_on_every_device_and_keeps_a_recorded_choice():
    """A CPU now groups too (looped seeds, not slower than separate runs); one seed never groups;
    a folder's recorded choice outlives a change of device or of this default."""
    from jaxbench.plan import decide_grouping

    for backend in ("cpu", "gpu", None):
        assert decide_grouping([0, 1, 2], "auto", None, backend)["mode"] == "group"
    assert "looped" in decide_grouping([0, 1], "auto", None, "cpu")["reason"]
    assert decide_grouping([0], "auto", None, "cpu")["mode"] == "sequential"
    old = {"mode": "sequential", "reason": "recorded"}
    assert decide_grouping([0, 1, 2], "auto", old, "cpu") == old
    assert decide_grouping([0, 1], "sequential", None, "gpu")["mode"] == "sequential"


def wait_for(proc, pattern, seen, start=0, timeout=300):
    """Read the suite's output into seen[0] until `pattern` appears after position `start`."""
    import re

    deadline = time.time() + timeout
    while not re.search(pattern, seen[0][start:]):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"ended before {pattern!r}:\n{seen[0]}"
        seen[0] += line
        assert time.time() < deadline, seen[0]


def lock_released(out, timeout=30.0) -> bool:
    """The suite's lock is free: no process of the killed suite (its runs hold it too) lives."""
    import fcntl

    deadline = time.time() + timeout
    with open(out / LOCK) as f:
        while time.time() < deadline:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
            except OSError:
                time.sleep(0.1)
    return False


def test_a_killed_suite_reruns_to_the_numbers_of_an_uninterrupted_one(fixture_suite, tmp_path):
    # The uninterrupted numbers: both seeds in one process as a looped seed group, which runs
    # the very executable a one-seed run compiles on each seed's own arrays, so it gives the
    # one-seed runs' numbers bit for bit (tests/test_seeds.py).
    ref = tmp_path / "ref"
    done = subprocess.run([sys.executable, "-m", "jaxbench.run", "--exp", "fmnist_baseline",
                           "--arrays", str(fixture_suite / "f.npz"), "--epochs", "3",
                           "--xla-cpu", "default", "--seeds", "0,1", "--seed-group", "loop",
                           "--out", str(ref)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = {s: read(ref, "fmnist_baseline", s) for s in (0, 1)}
    assert reference[0] != reference[1]

    out = tmp_path / "out"
    proc = subprocess.Popen(cli(*suite_args(fixture_suite, out, "--warmup-seconds", "0.5")),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = [""]
    wait_for(proc, r"=== \[2/2\]", seen)  # seed 0 finished, seed 1 started
    assert "ESTIMATED total" in seen[0] and "one after another" in seen[0]
    wait_for(proc, r"\[fmnist_baseline\] epoch 1/3", seen, start=seen[0].index("=== [2/2]"))
    # Kill as soon as seed 1's first checkpoint is committed: two of its epochs are left then.
    # A fixed delay after a later epoch's line was a race: the relayed line can reach this test
    # late, and on a loaded 2-core machine seed 1 had finished before the kill.
    ckpt = checkpoint_dir(out, "fmnist_baseline", (1,), "single")
    deadline = time.time() + 60
    while not has_checkpoint(ckpt):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint of seed 1 appeared"
        time.sleep(0.002)
    assert proc.poll() is None, "the suite finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_released(out), "a run of the killed suite outlived it"
    assert has_checkpoint(ckpt)
    summary = out / "runs" / "fmnist_baseline" / "seed1" / "summary.json"
    epochs_done = json.loads(summary.read_text())["epochs_completed"] if summary.exists() else 0
    assert epochs_done < 3, "seed 1 finished before the kill"

    res = subprocess.run(cli(*suite_args(fixture_suite, out, "--no-estimate")), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "finished: skipped" in res.stdout and "resume at epoch" in res.stdout
    assert "resumed from" in res.stdout and "=== [1/1]" in res.stdout
    for seed in (0, 1):
        # metrics and parameter digest
        assert read(out / "runs", "fmnist_baseline", seed) == reference[seed]

    group = json.loads((out / "runs" / "fmnist_baseline" / "summary.json").read_text())
    assert group["kind"] == "seed_group" and group["seeds"] == [0, 1]
    assert (out / "README.md").is_file() and (out / "curves_fashion_mnist.png").is_file()
    assert not (out / "checkpoints").exists()  # deleted once every run finished
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "complete" and prov["finished"] and prov["started"]
    assert [s["status"] for s in prov["invocations"]] == ["running", "done"]  # the killed one, then
    assert prov["commit"] and isinstance(prov["dirty"], bool) and prov["versions"]["jax"]
    assert prov["device"]["platform"] == "cpu" and "--fmnist-arrays" in prov["command"]
    assert prov["grouping"]["fmnist_baseline"]["mode"] == "sequential"

    again = subprocess.run(cli(*suite_args(fixture_suite, out, "--no-estimate")), cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to run" in again.stdout and "===" not in again.stdout
    assert read(out / "runs", "fmnist_baseline", 1) == reference[1]


def test_a_group_suite_trains_its_seeds_as_one_program(fixture_suite, tmp_path):
    """--grouping group: one `jaxbench.run --seeds 0,1` run; its own group summary; no checkpoints
    left once finished."""
    out = tmp_path / "out"
    args = suite_args(fixture_suite, out, "--no-estimate", "--epochs", "1")
    args[args.index("sequential")] = "group"
    res = subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--seeds 0,1" in res.stdout and "=== [1/1]" in res.stdout
    group = json.loads((out / "runs" / "fmnist_baseline" / "summary.json").read_text())
    assert group["seeds"] == [0, 1] and "assembled_by" not in group
    for seed in (0, 1):
        summary = json.loads((out / "runs" / "fmnist_baseline" / f"seed{seed}" / "summary.json").read_text())
        assert summary["seed_group"] == [0, 1] and summary["epochs_completed"] == 1
    assert not (out / "checkpoints").exists() and (out / "README.md").is_file()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["grouping"]["fmnist_baseline"] == {"mode": "group", "reason": "set by --grouping group"}


def test_the_estimate_counts_the_steps_an_experiment_really_runs():
    """Setup + epochs left x (train steps x step time + eval batches x batch time), on the
    experiment's own train/eval limits when it sets them."""
    from jaxbench.plan import Job, estimate

    timing = {"single": {"step_s": 0.01, "eval_batch_s": 0.005, "setup_s": 20.0, "seeds": 1}}
    cfg = config.load("tiny_target")  # 3,125 steps and 313 eval batches of 32 per epoch
    full = estimate(Job("tiny_target", cfg, (0,), "single", True, 5), timing, (100_000, 10_000))
    assert full["epochs"] == 20 and full["epoch_s"] == pytest.approx(3125 * 0.01 + 313 * 0.005)
    assert full["total_s"] == pytest.approx(20.0 + 20 * full["epoch_s"])
    short = cfg.replace(train_limit=3200, eval_limit=1000)  # 100 steps, 32 batches
    job = Job("tiny_target", short, (0,), "single", False, 0)
    assert estimate(job, timing, (100_000, 10_000))["epoch_s"] == pytest.approx(100 * 0.01 + 32 * 0.005)
