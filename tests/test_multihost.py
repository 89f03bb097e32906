"""Several processes on one machine, as on several hosts: `python -m jaxbench.launch`.

Two processes with one CPU device each (their all-reduces through gloo) against one process with
two forced host devices and one process with one device, at the same global batch; kill -9 of one
process; resume with two processes; what the launcher does when a process fails.

Default run: 2 processes == 1 process x 2 devices bit for bit, summary.json's record, the
launcher's failure handling (on stand-in processes), process 0 first. `-m slow`: against one
device (float tolerance), kill -9 mid-epoch then --resume, a lost process without the launcher,
real Fashion-MNIST prepared by process 0 and --restart.
"""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import FMNIST_FILES, REPO, synthetic_split

KEYS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr")
EPOCHS = 2
NAME = "mh_target"
# TargetCNN (4 BatchNorm blocks) at 16x16, so a few epochs fit in seconds. SGD with momentum:
# Adam's first steps are lr * sign(g), which flips on float noise wherever a gradient entry is ~0,
# so against one device it would show Adam's amplification rather than how closely runs agree.
EXPERIMENT = """
description = "multi-process tests: small TargetCNN"
dataset = "fashion_mnist"
model = "target"
optimizer = "sgd"
learning_rate = 0.01
schedule = "cosine"
batch_size = 32
epochs = 2
seed = 0
image_size = 16
train_split = "train"
eval_split = "test"
"""


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    from jaxbench import data

    path = tmp_path_factory.mktemp("arrays") / "fmnist.npz"
    data.save_arrays(path, "fashion_mnist", synthetic_split(192), synthetic_split(64, seed=1))
    return path


@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    """The run's flags; --xla-cpu fixed so every run compiles the same program (the automatic
    choice times candidates, and timings differ from run to run)."""
    exp = tmp_path_factory.mktemp("exp") / f"{NAME}.toml"
    exp.write_text(EXPERIMENT)
    return ["--exp", str(exp), "--epochs", str(EPOCHS), "--xla-cpu", "default"]


def env(devices: int = 1) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_cmd(*args):
    return [sys.executable, "-m", "jaxbench.run", *args]


def launch_cmd(*args, nproc=2):
    return [sys.executable, "-m", "jaxbench.launch", "--nproc", str(nproc), "--timeout", "300",
            "--", *args]


def read(out):
    run = out / NAME
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [[r[k] for k in KEYS] for r in rows], json.loads((run / "summary.json").read_text())


def final_state(out) -> dict:
    """The last checkpoint's TrainState as numpy arrays (params, batch_stats, opt_state, step)."""
    import orbax.checkpoint as ocp
    import jax

    folder = out / NAME / "checkpoints"
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    path = folder / str(step) / "train"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    logging.disable(logging.ERROR)  # orbax complains that the saving devices are not ours
    try:
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["state"]
    finally:
        logging.disable(logging.NOTSET)


def leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def runs(arrays, run_args, tmp_path_factory):
    """The same job three ways, each run when a test first asks for it: "1x1" (1 process x 1
    device), "1x2" (1 process x 2 devices), "2x1" (2 processes x 1 device, by the launcher)."""
    done = {}

    def get(name):
        if name not in done:
            out = done[name] = tmp_path_factory.mktemp(name)
            args = [*run_args, "--arrays", str(arrays), "--out", str(out)]
            if name == "2x1":
                res = subprocess.run(launch_cmd(*args), cwd=REPO, capture_output=True, text=True)
                (out / "launch.stdout").write_text(res.stdout)
            else:
                res = subprocess.run(run_cmd(*args), cwd=REPO, env=env(int(name[-1])),
                                     capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-3000:]
        return done[name]

    return get


def test_two_processes_train_like_two_devices_bit_for_bit(runs):
    """2 processes x 1 device == 1 process x 2 devices, exactly: the same partitioned program
    runs on each device, and an all-reduce over two devices is one float addition a + b, which
    is commutative, so gloo between processes and XLA's in-process all-reduce give the same bits."""
    rows, summary = read(runs("2x1"))
    ref_rows, ref_summary = read(runs("1x2"))
    assert len(rows) == EPOCHS and rows == ref_rows
    assert summary["params_sha256"] == ref_summary["params_sha256"]
    state, ref_state = final_state(runs("2x1")), final_state(runs("1x2"))
    assert leaves(state["batch_stats"]) and all(  # BatchNorm running means and variances
        np.array_equal(a, b) for a, b in zip(leaves(state["batch_stats"]),
                                             leaves(ref_state["batch_stats"])))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(ref_state)))


@pytest.mark.slow
def test_two_processes_train_like_one_device_to_float_tolerance(runs):
    """Against one device only float tolerance: each device sums its half of the batch before
    the all-reduce, another summation order for the gradient and BatchNorm statistics sums."""
    rows, _ = read(runs("2x1"))
    ref_rows, _ = read(runs("1x1"))
    # About 10x what was seen after 12 steps. Losses: 3e-5 relative; accuracies, learning rates
    # equal.
    np.testing.assert_allclose(np.array(rows), np.array(ref_rows), rtol=5e-4, atol=0)
    state, ref_state = final_state(runs("2x1")), final_state(runs("1x1"))
    # BatchNorm running statistics, per tensor relative to its norm: up to 1.4e-4.
    for a, b in zip(leaves(state["batch_stats"]), leaves(ref_state["batch_stats"])):
        assert np.linalg.norm(a - b) <= 2e-3 * np.linalg.norm(b), (a, b)
    # Parameters, all of them relative to their norm: 1.3e-5; per tensor up to 1.7e-3 (the
    # BatchNorm biases start at zero and stay small).
    a, b = (np.concatenate([x.ravel() for x in leaves(s["params"])]) for s in (state, ref_state))
    assert np.linalg.norm(a - b) <= 2e-4 * np.linalg.norm(b)
    for a, b in zip(leaves(state["params"]), leaves(ref_state["params"])):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6


def test_summary_records_processes_devices_and_global_batch(runs):
    _, summary = read(runs("2x1"))
    assert summary["parallel"] == {"processes": 2, "devices": 2, "local_devices": 1,
                                   "global_batch": 32, "per_device_batch": 16,
                                   "cpu_collectives": "gloo"}
    assert read(runs("1x2"))[1]["parallel"] == {"processes": 1, "devices": 2, "local_devices": 2,
                                                "global_batch": 32, "per_device_batch": 16}
    # Process 0 alone writes the outputs (and says so); both processes train and print.
    stdout = (runs("2x1") / "launch.stdout").read_text()
    assert re.search(r"^\[p0\] .*wrote metrics.jsonl", stdout, re.M)
    assert not re.search(r"^\[p1\] .*wrote metrics.jsonl", stdout, re.M)
    assert re.search(rf"^\[p1\] .*epoch {EPOCHS}/{EPOCHS}", stdout, re.M)
    assert not list((runs("2x1") / NAME).glob("*.tmp"))


def start_and_read_pids(cmd) -> tuple[subprocess.Popen, dict[str, int], str]:
    """Start the launcher; return it, {process index: pid} and its stderr so far."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids, err = {}, ""
    while len(pids) < 2:  # "process I: pid N" comes on stderr before any output of theirs
        line = proc.stderr.readline()
        assert line, err
        err += line
        pids = {int(i): int(pid) for i, pid in re.findall(r"process (\d): pid (\d+)", err)}
    return proc, pids, err


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX is imported here; they exec
def test_the_launcher_stops_the_others_when_one_is_killed(monkeypatch, capsys):
    """kill -9 of one process: named, the others stopped at once, exit 137, nothing left."""
    from jaxbench import launch

    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    monkeypatch.setattr(launch.Launcher, "command", lambda self, i: sleeper)
    real_start = launch.Launcher.start

    seen = {"out": "", "err": ""}

    def start_then_kill(self):
        real_start(self)
        deadline = time.time() + 60
        while seen["out"].count("up") < 2:  # both running, then process 1 dies
            captured = capsys.readouterr()
            seen["out"] += captured.out
            seen["err"] += captured.err
            assert time.time() < deadline, seen
            time.sleep(0.05)
        os.kill(self.procs[1].pid, signal.SIGKILL)

    monkeypatch.setattr(launch.Launcher, "start", start_then_kill)
    t0 = time.time()
    code = launch.main(["--nproc", "2", "--", "--exp", "x"])
    assert code == 137 and time.time() - t0 < 30
    err = seen["err"] + capsys.readouterr().err
    assert re.search(r"failed: process 1 \(pid \d+\) was killed by SIGKILL", err), err
    assert "killing process(es) 0" in err and "--resume" in err
    for pid in re.findall(r"process \d: pid (\d+)", err):
        with pytest.raises(ProcessLookupError):  # reaped: no orphan, no zombie
            os.kill(int(pid), 0)


SLEEPERS = textwrap.dedent("""
    import sys
    from jaxbench import launch
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    launch.Launcher.command = lambda self, i: sleeper
    sys.exit(launch.main(["--nproc", "2", "--", "--exp", "x"]))
""")


def test_ctrl_c_of_the_launcher_kills_every_process():
    proc, pids, err = start_and_read_pids([sys.executable, "-c", SLEEPERS])
    try:
        assert proc.stdout.readline() and proc.stdout.readline()  # both "up"
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err + rest
    assert "interrupted (SIGINT)" in rest and "--resume" in rest
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_two_processes_resume_identically(arrays, run_args, tmp_path):
    """A real run: kill -9 of process 1 inside epoch 3; the launcher names it and exits 137 at
    once; `--resume` with two processes then ends exactly like the uninterrupted run."""
    args = [*run_args, "--epochs", "4", "--arrays", str(arrays)]  # a later --epochs wins
    ref = subprocess.run(launch_cmd(*args, "--out", str(tmp_path / "ref")), cwd=REPO,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args += ["--out", str(tmp_path / "run")]
    proc, pids, err_so_far = start_and_read_pids(launch_cmd(*args))
    try:
        seen = ""
        # After epoch 2's line: its checkpoint is being written, epoch 1's is complete (an
        # asynchronous save finishes before the next one starts).
        while not re.search(r"^\[p1\] .*epoch 2/4", seen, re.M):
            line = proc.stdout.readline()
            assert line, f"the launcher ended early: {seen}"
            seen += line
        random.seed(7)
        time.sleep(random.uniform(0.0, 0.5))  # inside epoch 3 (or epoch 2's checkpoint)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(pids[1], signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_so_far + err
    assert proc.returncode == 137 and time.time() - killed < 30, err[-3000:]
    assert f"failed: process 1 (pid {pids[1]}) was killed by SIGKILL" in err
    assert "--resume" in err
    for pid in pids.values():  # no orphan: both are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    res = subprocess.run(launch_cmd(*args, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"^\[p1\] .*resumed from", res.stdout, re.M)
    rows, summary = read(tmp_path / "run")
    ref_rows, ref_summary = read(tmp_path / "ref")
    assert rows == ref_rows  # every epoch once, the same numbers
    assert summary["params_sha256"] == ref_summary["params_sha256"]


def test_an_error_in_one_process_ends_all_with_its_exit_code(tmp_path):
    """A bad --arrays file: process 0 fails to load it, process 1 hears so instead of waiting."""
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    res = subprocess.run(launch_cmd("--exp", "fmnist_baseline", "--arrays", str(bad)), cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    assert re.search(r"^\[p0\] error: --arrays", res.stderr, re.M)
    assert re.search(r"^\[p1\] error: process 0 failed at loading the data", res.stderr, re.M)
    assert "[launch] failed: process" in res.stderr and "Traceback" not in res.stderr
    assert "--resume" not in res.stderr  # a usage error: nothing trained, nothing to resume


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2"], "nothing to run"),
    (["--port", "99999", "--", "--exp", "fmnist_baseline"], "expected a port from 1 to 65535"),
    (["--", "--exp", "fmnist_baseline", "--process-id", "1"], "--process-id: the launcher sets"),
    (["--", "--exp", "fmnist_baseline", "--distributed"], "--distributed: the launcher sets"),
])
def test_launcher_usage_errors_exit_2(argv, message):
    res = subprocess.run([sys.executable, "-m", "jaxbench.launch", *argv], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


AGREE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from jaxbench import distributed
    distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax
    me, folder = jax.process_index(), Path(sys.argv[3])
    # A setting decided by timing: each process may decide differently; all take process 0's.
    print("agreed", distributed.agree(["ynn-off", "ynn-reduce"][me]))
    # process0_first: process 0's job is done before any other process starts its own.
    def job():
        if me == 0:
            import time; time.sleep(1.0); (folder / "ready").write_text("0")
        return (folder / "ready").read_text()
    print("first", distributed.process0_first(job))
    # on_process0: process 0 alone runs the job; every process returns once it is done.
    distributed.on_process0(lambda: (folder / "only").write_text(str(me)))
    print("only", (folder / "only").read_text())
    if distributed.is_process0():
        import time; time.sleep(1.0); (folder / "late").write_text("0")
    distributed.barrier("test")
    print("barrier", (folder / "late").read_text())
    print("backend", jax.default_backend(), jax.device_count(),
          jax.config.jax_cpu_collectives_implementation)
""")


def test_process_zero_decides_and_goes_first(tmp_path):
    from jaxbench.launch import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, coordinator, str(i), str(tmp_path)],
                              cwd=REPO, env=env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, out + err[-3000:]
        lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        assert lines["agreed"] == "ynn-off"  # process 0's value on both
        assert lines["first"] == "0" and lines["only"] == "0" and lines["barrier"] == "0"
        assert lines["backend"] == "cpu 2 gloo"


@pytest.mark.slow
def test_without_the_launcher_a_lost_process_is_named_within_the_heartbeat_timeout(
        arrays, run_args, tmp_path):
    """On a real cluster nobody supervises: JAX's coordination service declares a silent process
    lost after its heartbeat timeout (JAXBENCH_HEARTBEAT_TIMEOUT_S, JAX's default 100 s) and ends
    the others, naming it."""
    from jaxbench.launch import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    e = dict(env(1), JAXBENCH_HEARTBEAT_TIMEOUT_S="5")
    procs = [subprocess.Popen(run_cmd(*run_args[:2], "--epochs", "300", "--arrays", str(arrays),
                                      "--out", str(tmp_path), "--distributed", "--coordinator",
                                      coordinator, "--num-processes", "2", "--process-id", str(i)),
                              cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        seen = ""
        while "epoch 1/300" not in seen:
            line = procs[0].stdout.readline()
            assert line, seen
            seen += line
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode != 0
        assert time.time() - killed < 60
        assert re.search(r"stopped sending heartbeats\):\s*1\b", err), err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_real_fashion_mnist_prepared_by_process_0_while_process_1_waits(tmp_path):
    """tfds prepares the real files into a fresh folder once (process 0), which takes longer than
    gloo's 30 s connection timeout; process 1 waits for it, then both train. Then --restart."""
    if not (FMNIST_FILES / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST files not found in {FMNIST_FILES}")
    args = ["--exp", "fmnist_baseline", "--epochs", "1", "--train-limit", "512", "--eval-limit",
            "512", "--manual-dir", str(FMNIST_FILES), "--data-dir", str(tmp_path / "tfds"),
            "--out", str(tmp_path / "out")]
    res = subprocess.run(launch_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # Again over the finished run's checkpoints: process 0 clears them, the others wait.
    again = subprocess.run(launch_cmd(*args, "--restart"), cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^\[p0\] .*prepared", res.stdout + res.stderr, re.M)
    assert not re.search(r"^\[p1\] .*prepared", res.stdout + res.stderr, re.M)
    for i in (0, 1):
        assert re.search(rf"^\[p{i}\] \[fmnist_baseline\] epoch 1/1", res.stdout, re.M)
    summary = json.loads((tmp_path / "out" / "fmnist_baseline" / "summary.json").read_text())
    assert summary["parallel"]["processes"] == 2 and summary["train_examples"] == 512
