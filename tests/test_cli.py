"""`python -m jaxbench.run` end to end, and every user error: one paragraph, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from jaxbench import perf, run
from conftest import REPO, synthetic_split


def cli(*args, cwd=REPO):
    # Offline, as CI is: without it a machine with network would let tfds download.
    env = dict(os.environ, JAXBENCH_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "jaxbench.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def check_outputs(out, exp, epochs):
    rows = [json.loads(l) for l in (out / exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for r in rows:
        assert {"train_loss", "train_acc", "eval_loss", "eval_acc", "epoch_time_s",
                "images_per_s", "lr"} <= set(r)
        assert 0 <= r["eval_acc"] <= 1 and r["epoch_time_s"] > 0
    s = json.loads((out / exp / "summary.json").read_text())
    assert s["experiment"] == exp and s["framework"] == "jax"
    assert s["final_eval_acc"] == rows[-1]["eval_acc"]
    assert s["best_eval_acc"] == max(r["eval_acc"] for r in rows)
    for key in ("params", "best_epoch", "mean_epoch_time_s", "compile_time_s", "device",
                "versions", "config"):
        assert key in s, key
    assert {"python", "jax", "flax", "optax", "tfds"} <= set(s["versions"])
    assert s["config"]["epochs"] == epochs
    return s


def test_cli_end_to_end_on_real_data(fmnist_tfds_dir, tmp_path):
    res = cli("--exp", "fmnist_baseline", "--epochs", "2", "--train-limit", "256",
              "--eval-limit", "100", "--data-dir", str(fmnist_tfds_dir), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "epoch 2/2" in res.stdout
    s = check_outputs(tmp_path, "fmnist_baseline", 2)
    assert s["params"] == 1_055_082 and s["eval_examples"] == 100
    assert s["config"]["perf"]["dtype"] == "float32"
    # Every speed setting the run used is on record, resolved, with its reason.
    used = s["perf"]
    assert used["compiler_options"] == perf.XLA_CPU_OPTIONS[used["xla_cpu"]]
    assert set(used["reasons"]) == {"steps_per_call", "stem_conv", "xla_cpu", "seed_group"}
    if s["device"]["platform"] == "cpu":
        assert used["steps_per_call"] == 1 and used["stem_conv"] == "taps"
        check = used["xla_cpu_check"]  # the self-check behind the compile choice
        assert check["candidates"][used["xla_cpu"]]["max_error"] <= perf.AGREEMENT


def test_cli_end_to_end_with_mock_data(tmp_path, mock_manual_dir):
    manual = mock_manual_dir
    with tfds.testing.mock_data(num_examples=80):
        # BaselineCNN: this is about the CLI and tfds' mock data; TargetCNN in bfloat16 trains in
        # tests/test_models.py.
        code = run.main(["--exp", "fmnist_baseline", "--epochs", "1", "--batch-size", "16",
                         "--dtype", "bfloat16", "--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(manual),
                         "--out", str(tmp_path / "out"), "--xla-cpu", "default"])  # self-check: test_speed_numerics
    assert code == 0
    s = check_outputs(tmp_path / "out", "fmnist_baseline", 1)
    assert s["params"] == 1_055_082 and s["config"]["batch_size"] == 16
    assert s["config"]["perf"]["dtype"] == "bfloat16" and s["perf"]["dtype"] == "bfloat16"


def test_list_names_every_experiment():
    res = cli("--list")
    assert res.returncode == 0
    for name in ("fmnist_baseline", "fmnist_target", "tiny_baseline", "tiny_target"):
        assert name in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--exp", "nope"], "unknown experiment 'nope'"),
    (["--exp", "missing.toml"], "--exp missing.toml: no such experiment file"),
    ([], "--exp NAME is required"),
    (["--exp", "fmnist_baseline", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["--exp", "fmnist_baseline", "--batch-size", "-4"], "--batch-size: expected a positive integer"),
    (["--exp", "fmnist_baseline", "--epochs", "two"], "expected a positive integer, got 'two'"),
    (["--exp", "fmnist_baseline", "--train-limit", "1.5"], "--train-limit"),
    (["--exp", "fmnist_baseline", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--exp", "fmnist_baseline", "--bogus"], "unrecognized arguments: --bogus"),
    (["--exp", "fmnist_baseline", "--epoch", "3"], "unrecognized arguments: --epoch"),
    (["--exp", "fmnist_baseline", "--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["--exp", "fmnist_baseline", "--xla-cpu", "fast"], "--xla-cpu: invalid choice: 'fast'"),
    (["--exp", "fmnist_baseline", "--stem-conv", "fft"], "--stem-conv: invalid choice: 'fft'"),
])
def test_bad_cli_values_exit_2_without_traceback(args, message):
    res = cli(*args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    if "unknown experiment" in message:
        assert "fmnist_baseline" in res.stderr and "tiny_target" in res.stderr


def test_data_not_available_offline_exits_2_naming_files_and_flag(tmp_path):
    res = cli("--exp", "fmnist_baseline", "--data-dir", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--manual-dir" in res.stderr and "t10k-images-idx3-ubyte.gz" in res.stderr
    res = cli("--exp", "fmnist_baseline", "--data-dir", str(tmp_path), "--manual-dir",
              str(tmp_path / "absent"))
    assert res.returncode == 2 and "not a folder" in res.stderr


def test_output_paths_and_batches_are_checked_before_any_work(tmp_path, capsys):
    """An unusable --out is named before the data loads (Tiny ImageNet: seconds to minutes);
    a batch larger than the train set before anything compiles or is written."""
    (tmp_path / "file").touch()
    absent = str(tmp_path / "absent")
    assert run.main(["--exp", "fmnist_baseline", "--out", str(tmp_path / "file"),
                     "--manual-dir", absent]) == 2
    assert "--out: cannot create" in capsys.readouterr().err
    assert run.main(["--exp", "fmnist_baseline", "--checkpoint-dir", str(tmp_path / "file"),
                     "--manual-dir", absent]) == 2
    assert "--checkpoint-dir: " in capsys.readouterr().err
    from jaxbench import data

    arrays = tmp_path / "a.npz"
    data.save_arrays(arrays, "fashion_mnist", synthetic_split(64), synthetic_split(16, seed=1))
    out = tmp_path / "out"
    for framework in ("jax", "torch"):
        assert run.main(["--exp", "fmnist_baseline", "--arrays", str(arrays), "--batch-size",
                         "128", "--framework", framework, "--out", str(out)]) == 2
        assert "64 training examples are fewer than one batch of 128" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["report", "bench", "export"])
def test_the_other_commands_name_an_unusable_out(command, tmp_path, capsys):
    """jaxbench.report, .bench and `.data export` check --out before any work, as run does."""
    from jaxbench import bench, cli as cli_lib, report

    (tmp_path / "file").touch()
    out = tmp_path / "file" / ("x.npz" if command == "export" else "folder")
    main, argv = {
        "report": (report.main, ["paper", str(tmp_path), "--out", str(out)]),
        "bench": (bench.main, ["--exp", "fmnist_baseline", "--steps", "1", "--out", str(out)]),
        "export": (cli_lib.export_main, ["export", "--exp", "fmnist_baseline", "--out", str(out),
                                         "--manual-dir", str(tmp_path / "absent")]),
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot create {tmp_path / 'file'}" in err or f"{tmp_path / 'file'} is a file" in err
    assert "Traceback" not in err
    assert not (tmp_path / "absent").exists()
    # A typo in the experiment's name is met before the benchmark's yardstick and PyTorch.
    if command == "bench":
        assert bench.main(["--exp", "nope", "--out", str(tmp_path / "b")]) == 2
        assert "unknown experiment 'nope'" in capsys.readouterr().err
        assert not (tmp_path / "b").exists()
