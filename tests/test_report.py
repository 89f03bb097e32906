"""`python -m jaxbench.report paper`: Tables I/II, speed tables, curves, errors, on synthetic run folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jaxbench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H200 = {"platform": "gpu", "name": "NVIDIA H200", "count": 1, "cpu": "Intel(R) Xeon(R) Processor", "cores": 16}
EPYC = {"platform": "cpu", "name": "cpu", "count": 1, "cpu": "AMD EPYC", "cores": 2}


def write_run(folder: Path, exp: str, model: str, seed: int, accs: list[float], *, new_keys: bool,
              device=H200, config_epochs: int = 25, epoch_time: float = 2.0, extra=None) -> Path:
    """A run folder as jaxbench.run writes it; `new_keys` writes eval_* (with wrong test_* aliases,
    so a test can tell which one the report read), otherwise the older test_* names only."""
    folder.mkdir(parents=True)
    lines = []
    for epoch, acc in enumerate(accs, 1):
        rec = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": min(0.99, acc + 0.05),
               "epoch_time_s": epoch_time, "lr": 0.001}
        if new_keys:
            rec |= {"eval_loss": 0.5 / epoch, "eval_acc": acc, "test_loss": 9.0, "test_acc": 0.01}
        else:
            rec |= {"test_loss": 0.5 / epoch, "test_acc": acc}
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    best = max(accs)
    acc_keys = ({"final_eval_acc": accs[-1], "best_eval_acc": best, "final_test_acc": 0.01, "best_test_acc": 0.01}
                if new_keys else {"final_test_acc": accs[-1], "best_test_acc": best})
    summary = {
        "experiment": exp, "framework": "jax", "params": 1_055_082 if model == "baseline" else 2_423_882,
        "device": device, "versions": {"python": "3.12", "jax": "0.11.2", "tfds": "4.9.10"},
        "config": {"name": exp, "dataset": "fashion_mnist", "model": model, "optimizer": "adam",
                   "learning_rate": 0.001, "batch_size": 32, "epochs": config_epochs, "seed": seed,
                   "schedule": "constant", "image_size": 64, "train_split": "train", "eval_split": "test",
                   "train_limit": None, "eval_limit": None, "dtype": "float32", "num_classes": 10},
        "train_examples": 60000, "eval_examples": 10000, "epochs_completed": len(accs),
        "best_epoch": accs.index(best) + 1, "mean_epoch_time_s": epoch_time, "compile_time_s": 1.0,
        **acc_keys, **(extra or {}),
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("measured")
    # BaselineCNN, older key names: finals 90/91/92% (mean 91.00, std 1.00); seeds 0 and 1 reach 99% of
    # their final accuracy at epoch 4, seed 2 at epoch 3 (mean 3.67).
    for seed, third in ((0, 0.885), (1, 0.895), (2, 0.915)):
        accs = [0.60 + 0.01 * seed, 0.80 + 0.01 * seed, third] + [0.90 + 0.01 * seed] * 22
        write_run(root / "gpu" / f"fmnist_baseline_seed{seed}", "fmnist_baseline", "baseline", seed, accs,
                  new_keys=False, epoch_time=0.5 + 0.1 * seed)
    # TargetCNN, eval_* keys: finals 93/95% (mean 94.00, std 1.41), 99% reached at epoch 2; one
    # seed group of two, so each seed's summary holds the group's 2.0 s epoch.
    for seed, final in ((0, 0.93), (1, 0.95)):
        write_run(root / "gpu" / f"fmnist_target_seed{seed}", "fmnist_target", "target", seed,
                  [0.80, final - 0.005] + [final] * 23, new_keys=True, extra={"seed_group": [0, 1]})
    # A 3-epoch run of the same experiment on a CPU: a shorter protocol.
    write_run(root / "cpu" / "fmnist_target_3ep", "fmnist_target", "target", 0, [0.70, 0.75, 0.80],
              new_keys=False, device=EPYC, config_epochs=3, epoch_time=900.0)
    bench = {"command": "python -m jaxbench.bench --exp fmnist_baseline --data-dir /some/where/tfds --out OUT",
             "machine": {"cpu": "AMD EPYC", "cores": 2, "jax_device": "cpu cpu"}, "versions": {"jax": "0.10.2"},
             "unit": "per 1,000 images",
             "experiments": {"fmnist_baseline": {"variants": {
                 "jax": {"per_1000_images_s": 0.5}, "torch-eager": {"per_1000_images_s": 0.4},
                 "torch-compile": {"per_1000_images_s": 1.0}}}}}
    (root / "cpu" / "speed").mkdir()
    (root / "cpu" / "speed" / "bench.json").write_text(json.dumps(bench))
    (root / "cpu" / "speed" / "provenance.json").write_text(json.dumps(
        {"speed_note": "Its PyTorch rows include a host-side cost found later."}))
    return root


@pytest.fixture(scope="module")
def generated(runs, tmp_path_factory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("results")
    rc = report.main(["paper", str(runs), "--out", str(out)])
    return rc, (out / "README.md").read_text(), out


def row(readme: str, *needles: str) -> list[str]:
    """The cells of the one table row holding every needle."""
    rows = [line for line in readme.splitlines() if line.startswith("|") and all(n in line for n in needles)]
    assert len(rows) == 1, (needles, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_table_rows_mean_std_n_and_epochs_to_99(generated):
    rc, readme, _ = generated
    assert rc == 0
    base = row(readme, "`fmnist_baseline`", "NVIDIA H200")
    assert base[3] == "3 (0, 1, 2)"
    assert base[4] == "91.00 ± 1.00%"  # final, older test_* keys
    assert base[5] == "91.00 ± 1.00%"  # best epoch
    assert base[6] == "3.7"  # epochs to 99% of final: (4 + 4 + 3) / 3
    assert base[7] == "0.60"  # mean of the runs' mean_epoch_time_s
    assert base[8] == "1,055,082" and base[9] == "25"
    assert base[10] == "92.3%" and base[11] == "~10 s" and base[12] == "-1.3 pp"
    target = row(readme, "`fmnist_target`", "NVIDIA H200")
    assert target[3] == "2 (0, 1)"
    assert target[4] == "94.00 ± 1.41%"  # eval_* preferred over the (wrong) test_* aliases
    assert target[6] == "2.0"
    assert target[7] == "1.00"  # per seed: the group's 2.0 s epoch over its two seeds
    assert target[10] == "89.5%"
    assert "**paper** acc (P100)" in readme
    assert "our TargetCNN beats our BaselineCNN, 94.00% vs 91.00%" in readme and "the reverse order" in readme


def test_not_measured_rows_give_the_command(generated):
    _, readme, _ = generated
    for exp in ("tiny_baseline", "tiny_target"):
        cells = row(readme, f"| `{exp}` |", "not measured")
        assert f"python -m jaxbench.run --exp {exp} --seed S --manual-dir" in cells[3]


def test_shorter_protocol_is_labelled_and_kept_apart(generated):
    _, readme, _ = generated
    short = readme.index("Shorter or changed protocols")
    cells = row(readme, "| TargetCNN (`fmnist_target`) | JAX | AMD EPYC", "3 epochs")
    assert cells[3] == "3 epochs instead of 25"
    assert cells[5] == "80.00%" and cells[10] == "3"
    assert readme.index("| TargetCNN (`fmnist_target`) | JAX | AMD EPYC") > short
    table_one = readme[readme.index("## Table I"):short]
    assert "AMD EPYC" not in table_one


def test_speed_table_ratio_within_one_file_and_no_local_paths(generated):
    _, readme, _ = generated
    cells = row(readme, "| fmnist_baseline | float32 |")
    assert cells[2:5] == ["30.0 s", "24.0 s", "60.0 s"]  # 60,000 images per epoch
    assert cells[5] == "1.25 (vs torch-eager)"
    assert "--data-dir DIR" in readme and "/some/where" not in readme
    # A bench file's provenance can carry a note, printed with its source line.
    assert re.search(r"^\[1\] .*speed/bench\.json.*; jax 0\.10\.2\. Its PyTorch rows include a "
                     r"host-side cost found later\.  $", readme, re.M)


def test_pngs_are_written_and_valid(generated):
    _, readme, out = generated
    png = out / "curves_fashion_mnist.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    assert "](curves_fashion_mnist.png)" in readme
    assert not (out / "curves_tiny_imagenet.png").exists()
    assert "Table II: Tiny ImageNet: no run with 2 or more epochs" in readme


def test_runs_used_lists_every_folder(generated, runs):
    _, readme, _ = generated
    listed = re.findall(r"^\| \[([^\]]+)\]\(", readme[readme.index("## Runs used"):], re.M)
    assert len(listed) == 6 and all(Path(p).name in {f.parent.name for f in runs.rglob("summary.json")}
                                    for p in listed)


@pytest.mark.parametrize("text", ['{"experiment": "fmnist_baseline", ', '{"experiment": "x", "config": {}}'])
def test_broken_summary_is_a_clear_error(tmp_path, capsys, text):
    bad = write_run(tmp_path / "in" / "fmnist_baseline_seed9", "fmnist_baseline", "baseline", 9, [0.5, 0.6],
                    new_keys=False)
    (bad / "summary.json").write_text(text)
    assert report.main(["paper", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad / "summary.json") in err and "Traceback" not in err
    assert not (tmp_path / "out" / "README.md").exists()


def test_missing_input_is_exit_2(tmp_path, capsys):
    assert report.main(["paper", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cross_hardware_agreement_needs_two_seeds_a_side(tmp_path):
    """One seed on a side has no spread: the report says so instead of judging agreement."""
    for seed, final in ((0, 0.90), (1, 0.92)):
        write_run(tmp_path / "runs" / f"gpu{seed}", "fmnist_baseline", "baseline", seed, [final] * 25,
                  new_keys=True)
    write_run(tmp_path / "runs" / "cpu0", "fmnist_baseline", "baseline", 0, [0.95] * 25, new_keys=True,
              device=EPYC)
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "README.md").read_text()
    assert "(n=1 / 2); with one seed on a side there is no seed spread to compare against." in text
    write_run(tmp_path / "runs" / "cpu1", "fmnist_baseline", "baseline", 1, [0.91] * 25, new_keys=True,
              device=EPYC)
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "b")]) == 0
    assert "overlap: they agree within the seed spread" in (tmp_path / "b" / "README.md").read_text()


def test_a_folder_names_each_runs_commit_and_the_runs_that_shared_the_machine(tmp_path):
    """provenance.json's `commits` gives each run folder its own commit in Runs used; runs listed in
    `shared_machine` drop out of the seconds per epoch, and the cell says how many were timed."""
    folder = tmp_path / "runs" / "2026-01-02-cpu"
    for seed, secs in ((0, 250.0), (1, 60.0), (2, 70.0)):
        write_run(folder / f"fmnist_baseline_seed{seed}", "fmnist_baseline", "baseline", seed, [0.9] * 25,
                  new_keys=True, device=EPYC, epoch_time=secs)
    (folder / "provenance.json").write_text(json.dumps({
        "commit": "aaaaaaa (seed 0), bbbbbbb (seeds 1, 2)",
        "commits": {"fmnist_baseline_seed0": "aaaaaaa", "fmnist_baseline_seed1": "bbbbbbb",
                    "fmnist_baseline_seed2": "bbbbbbb"},
        "shared_machine": ["fmnist_baseline_seed0"]}))
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "README.md").read_text()
    assert row(text, "`fmnist_baseline`", "AMD EPYC")[7] == "65.00 (2 of 3 runs; the others shared the machine)"
    assert "commit aaaaaaa" in row(text, "fmnist_baseline_seed0](")[-1]
    assert "commit bbbbbbb" in row(text, "fmnist_baseline_seed2](")[-1]
    (folder / "provenance.json").write_text(json.dumps({"shared_machine": [
        f"fmnist_baseline_seed{s}" for s in range(3)]}))
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "b")]) == 0
    cells = row((tmp_path / "b" / "README.md").read_text(), "`fmnist_baseline`", "AMD EPYC")
    assert cells[7] == "— (machine shared with other work)"


def test_a_bfloat16_run_is_its_own_protocol():
    """Newer summaries keep dtype in the config's [perf] table: a bfloat16 run must not be
    averaged into the float32 rows of Tables I/II."""
    from jaxbench import paper

    cfg = {"name": "fmnist_target", "dataset": "fashion_mnist", "model": "target",
           "optimizer": "adam", "learning_rate": 0.001, "batch_size": 32, "epochs": 25,
           "schedule": "constant", "image_size": 64, "train_limit": None, "eval_limit": None}
    summary = {"experiment": "fmnist_target", "epochs_completed": 25}
    assert paper.protocol_of(summary | {"config": cfg | {"perf": {"dtype": "float32"}}}) == ""
    assert paper.protocol_of(summary | {"config": cfg | {"perf": {"dtype": "bfloat16"}}}) \
        == "dtype bfloat16"


def test_what_the_report_leaves_out_or_refuses(tmp_path, capsys):
    """A run that finished no epoch (diverged in epoch 1) is left out with a note; the same seed
    in two folders is refused, naming both (it would count twice in n); a TPU run is labelled by
    its accelerator, not the host CPU; a train subset or another momentum is a protocol."""
    from jaxbench import paper

    write_run(tmp_path / "runs" / "ok", "fmnist_baseline", "baseline", 0, [0.9] * 25, new_keys=True)
    empty = tmp_path / "runs" / "diverged"
    empty.mkdir()
    (empty / "summary.json").write_text(json.dumps({"epochs_completed": 0}))
    (empty / "metrics.jsonl").write_text("")
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "a")]) == 0
    assert f"{empty} finished no epoch; left out of the report" in capsys.readouterr().err

    write_run(tmp_path / "runs" / "again", "fmnist_baseline", "baseline", 0, [0.8] * 25, new_keys=True)
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "seed 0 of fmnist_baseline on NVIDIA H200 is in two run folders" in err
    assert str(tmp_path / "runs" / "ok") in err and str(tmp_path / "runs" / "again") in err

    assert paper.hardware_of({"platform": "tpu", "name": "TPU v5 lite", "count": 1,
                              "cpu": "AMD EPYC", "cores": 8}) == "TPU v5 lite"
    cfg = {"name": "tiny_target", "dataset": "tiny_imagenet", "model": "target",
           "optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.01, "batch_size": 32,
           "epochs": 25, "schedule": "cosine", "image_size": 64, "train_split": "train",
           "eval_split": "validation", "train_limit": None, "eval_limit": None}
    summary = {"experiment": "tiny_target", "epochs_completed": 25, "train_examples": 100_000}
    assert paper.protocol_of(summary | {"config": cfg}) == ""
    assert paper.protocol_of(summary | {"config": cfg | {"momentum": 0.0}}) == "momentum 0.0"
    assert paper.protocol_of(summary | {"config": cfg, "train_examples": 5_000}) \
        == "5,000 train images instead of 100,000"


def test_the_twin_against_jax_and_a_folder_that_names_its_hardware(tmp_path):
    """PyTorch runs are labelled by how they ran (eager, torch-best, a compile mode) and compared
    with JAX's runs of the same experiment; a folder whose `provenance.json` names its hardware
    (another CPU under the same name) gets its own rows, speed table included, so seconds per
    epoch of two machines never share a row."""
    for seed, final in ((0, 0.90), (1, 0.92)):
        write_run(tmp_path / "runs" / "old" / f"jax{seed}", "fmnist_baseline", "baseline", seed,
                  [final] * 25, new_keys=True, device=EPYC, epoch_time=60.0)
    new = tmp_path / "runs" / "2026-01-03-cpu"
    for seed, final in ((0, 0.91), (1, 0.93)):
        write_run(new / f"torch{seed}", "fmnist_baseline", "baseline", seed, [final] * 25,
                  new_keys=True, device=EPYC, epoch_time=30.0,
                  extra={"framework": "torch", "torch_compile": "none"})
    write_run(new / "best0", "fmnist_baseline", "baseline", 0, [0.95] * 25, new_keys=True,
              device=EPYC, epoch_time=40.0, extra={"framework": "torch", "torch_compile": "best"})
    write_run(new / "compiled0", "fmnist_baseline", "baseline", 0, [0.95] * 25, new_keys=True,
              device=EPYC, extra={"framework": "torch", "torch_compile": "reduce-overhead"})
    (new / "provenance.json").write_text(json.dumps({"hardware": "AMD EPYC (family 26), 2 cores"}))
    bench = {"command": "python -m jaxbench.bench --exp fmnist_baseline --out OUT",
             "machine": {"cpu": "AMD EPYC", "cores": 2, "jax_device": "cpu cpu"},
             "versions": {}, "unit": "per 1,000 images", "experiments": {"fmnist_baseline": {
                 "variants": {"jax": {"per_1000_images_s": 0.3},
                              "torch-eager": {"per_1000_images_s": 0.5}}}}}
    (new / "bench.json").write_text(json.dumps(bench))
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert row(text, "`fmnist_baseline`", "| JAX |", "AMD EPYC, 2 cores")[7] == "60.00"
    eager = row(text, "`fmnist_baseline`", "PyTorch eager", "AMD EPYC (family 26), 2 cores")
    assert eager[3] == "2 (0, 1)" and eager[7] == "30.00"
    assert row(text, "`fmnist_baseline`", "PyTorch torch-best")[4] == "95.00%"
    assert row(text, "`fmnist_baseline`", "PyTorch compile (reduce-overhead)")[3] == "1 (0)"
    assert "compile (none)" not in text
    assert ("fmnist_baseline, JAX vs PyTorch eager (the twin: same model, start, data and "
            "schedule), on AMD EPYC, 2 cores vs AMD EPYC (family 26), 2 cores: 91.00% vs 92.00% "
            "final, difference -1.00 pp") in text
    assert "the seeds' min–max ranges overlap: they agree within the seed spread" in text
    assert ("JAX vs PyTorch torch-best (the twin: same model, start, data and schedule), on AMD "
            "EPYC, 2 cores vs AMD EPYC (family 26), 2 cores: 91.00% vs 95.00% final") in text
    assert "### AMD EPYC (family 26), 2 cores" in text  # the bench file's own speed table


def test_the_twin_is_compared_with_jax_on_its_own_hardware_when_jax_ran_there(tmp_path):
    """Once JAX has runs on the twin's hardware, the finding compares those two (framework the
    only difference), not the twin with JAX on other machines."""
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    for seed in (0, 1):
        write_run(old / f"jax{seed}", "fmnist_baseline", "baseline", seed, [0.90] * 25,
                  new_keys=True, device=EPYC)
        write_run(new / f"jax{seed}", "fmnist_baseline", "baseline", seed, [0.91 + seed / 100] * 25,
                  new_keys=True, device=EPYC)
        write_run(new / f"torch{seed}", "fmnist_baseline", "baseline", seed, [0.92] * 25,
                  new_keys=True, device=EPYC, extra={"framework": "torch", "torch_compile": "none"})
    (new / "provenance.json").write_text(json.dumps({"hardware": "AMD EPYC (family 26), 2 cores"}))
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert ("fmnist_baseline, JAX vs PyTorch eager (the twin: same model, start, data and "
            "schedule), on AMD EPYC (family 26), 2 cores: 91.50% vs 92.00% final") in text
    assert "JAX vs PyTorch eager (the twin: same model, start, data and schedule), on AMD EPYC, " \
           "2 cores vs" not in text
    assert text.count("JAX vs PyTorch") == 1


def test_findings_also_compare_the_last_epochs_mean_which_one_final_epoch_does_not_decide(tmp_path):
    """Late in training eval accuracy swings between epochs: two groups whose final epochs do not
    overlap can agree over their last 5 epochs, and the finding says both."""
    late = {"a": [0.91, 0.90, 0.91, 0.90], "b": [0.91, 0.91, 0.90, 0.91]}
    for name, last in (("a", 0.915), ("b", 0.905)):
        for seed in (0, 1):
            accs = [0.90] * 20 + late[name] + [last + seed / 1000]
            write_run(tmp_path / "runs" / name / f"s{seed}", "fmnist_baseline", "baseline", seed,
                      accs, new_keys=True, device=EPYC if name == "a" else H200)
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    line = next(x for x in text.splitlines() if "same code path, other hardware" in x)
    assert "91.55% vs 90.55% final" in line and "do not agree within the seed spread." in line
    assert ("Mean of the last 5 epochs: 90.71% vs 90.71%; the seeds' min–max ranges overlap: "
            "they agree within the seed spread.") in line


def test_the_findings_state_how_much_the_late_epochs_move_in_the_runs_given(tmp_path):
    """The late-epoch swing quoted above the findings is measured on the inputs, not fixed text."""
    write_run(tmp_path / "runs" / "s0", "fmnist_baseline", "baseline", 0,
              [0.80] * 20 + [0.90, 0.92, 0.90, 0.91, 0.91], new_keys=True, device=EPYC)
    assert report.main(["paper", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert "these full-protocol runs: Fashion-MNIST BaselineCNN 2.0 pp)" in text
