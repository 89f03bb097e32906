"""The PyTorch twin: layer parity with the Flax models, its step, its preprocessing, the benchmark."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

torch = pytest.importorskip("torch")

from jaxbench import bench, cli, config, data, loop, models, report, torch_twin  # noqa: E402
from conftest import synthetic_split  # noqa: E402


@pytest.mark.parametrize("name", ["baseline", "target", "densenet"])
@pytest.mark.parametrize("classes", [10, 200])
def test_layer_by_layer_parameter_parity(name, classes):
    flax_rows = [(path.rsplit("/", 1)[-1].rpartition("_")[0],
                  sum(int(np.prod(v.shape)) for v in params.values()))
                 for path, params in report.leaf_layers(models.build(name, classes))]
    assert torch_twin.layer_counts(torch_twin.build(name, classes)) == flax_rows


def test_init_matches_flax_lecun_normal_scale():
    model = torch_twin.build("target", 10)
    conv = model.features[7].weight
    assert conv.shape == (128, 128, 3, 3)  # fan_in 1152
    assert abs(conv.std().item() - (1 / 1152) ** 0.5) < 0.1 * (1 / 1152) ** 0.5
    assert conv.abs().max().item() <= 2 * (1 / 1152) ** 0.5 / 0.8796 + 1e-6


@pytest.mark.parametrize("shape", [(28, 28, 1), (64, 64, 3)])
def test_preprocessing_matches_jax(shape):
    images = np.random.default_rng(0).integers(0, 256, (4, *shape), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    ours = np.asarray(data.preprocess(jnp.asarray(images), mean, std, 64))
    twin = torch_twin.preprocess(torch.from_numpy(images), torch.from_numpy(mean),
                                 torch.from_numpy(std), 64).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(twin, ours, atol=1e-4)


@pytest.mark.parametrize("exp,dtype,mode", [("fmnist_baseline", "float32", "none"),
                                            ("tiny_target", "float32", "none"),
                                            ("tiny_target", "bfloat16", "none"),
                                            ("fmnist_target", "float32", "best")])
def test_a_torch_train_step_lowers_the_loss(exp, dtype, mode):
    # Small inputs: the size changes nothing here. 16x16 for bfloat16, whose PyTorch convolutions
    # on CPU are slow (tiny_target's six steps: 21 s at 32x32, 4 s at 16x16 on 2 cores).
    cfg = config.load(exp).replace(batch_size=16, dtype=dtype,
                                   image_size=16 if dtype == "bfloat16" else 32)
    shape = (28, 28, 1) if cfg.dataset == "fashion_mnist" else (64, 64, 3)
    split = synthetic_split(16, shape=shape, classes=cfg.num_classes)
    trainer = cli.make_trainer("torch", cfg, split, split, mode)  # best: fused Adam, tensor lr
    state = trainer.init_state()
    idx = np.arange(16)
    losses = [trainer._train_step(state, idx)[0].item() / 16 for _ in range(6)]
    assert losses[-1] < losses[0] * 0.9, losses


def test_the_twin_sets_the_learning_rate_from_optax_schedule():
    """The twin's optimizer gets, step by step, the learning rate the JAX path's optax uses."""
    from jaxbench import train

    cfg = config.load("tiny_baseline").replace(epochs=2, batch_size=16)
    twin = torch_twin.Trainer(cfg, synthetic_split(64, shape=(64, 64, 3), classes=200),
                              synthetic_split(16, shape=(64, 64, 3), classes=200))
    theirs = train.make_schedule(cfg, twin.steps_per_epoch)
    for step in range(0, 2 * twin.steps_per_epoch + 1):
        assert twin.schedule(step) == pytest.approx(float(theirs(step)), rel=1e-6, abs=1e-12)
    state = twin.init_state()
    twin._train_step(state, np.arange(16))
    assert state.optimizer.param_groups[0]["lr"] == twin.schedule(0)


def test_the_twin_tabulates_the_cosine_schedule_bit_for_bit_without_jax(monkeypatch):
    """The twin's per-step learning rate is a table lookup equal (==) to optax's per-step value,
    past the end of the run too, and a step runs no JAX op (per-step JAX cost ~1.8 ms on a GPU)."""
    import jax
    from jaxbench import train

    cfg = config.load("tiny_target").replace(epochs=3, batch_size=2)
    assert cfg.schedule == "cosine"
    twin = torch_twin.Trainer(cfg, synthetic_split(64, shape=(64, 64, 3), classes=200),
                              synthetic_split(4, shape=(64, 64, 3), classes=200))
    lr = train.make_schedule(cfg, twin.steps_per_epoch)
    total = cfg.epochs * twin.steps_per_epoch + 1
    with jax.default_device(jax.devices("cpu")[0]):
        theirs = [float(lr(s)) for s in range(total + 3)]
    assert theirs[-1] == theirs[total - 1] < theirs[total - 2] < theirs[0]  # cosine, clamped

    def no_jax(*args, **kwargs):
        raise AssertionError("the twin's schedule called into JAX")

    monkeypatch.setattr(jax.numpy, "cos", no_jax)
    monkeypatch.setattr(jax.numpy, "minimum", no_jax)
    assert [twin.schedule(s) for s in range(total + 3)] == theirs


def test_schedule_table_refuses_what_it_cannot_evaluate_exactly():
    """A schedule whose jaxpr nests another (a jitted piece) is refused by name, not tabulated
    wrong."""
    import jax

    assert torch_twin.schedule_table(lambda s: 0.5 * s + 1, 3).tolist() == [1.0, 1.5, 2.0]
    with pytest.raises(ValueError, match="jit"):
        torch_twin.schedule_table(lambda s: jax.jit(lambda t: t * 2.0)(s), 3)


def test_fit_with_the_twin_writes_the_same_outputs(tmp_path):
    cfg = config.load("fmnist_target").replace(epochs=2, batch_size=16)
    trainer = cli.make_trainer("torch", cfg, synthetic_split(64), synthetic_split(20, seed=1))
    s = loop.fit(cfg, trainer, tmp_path, framework="torch")
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and s["framework"] == "torch"
    assert s["params"] == 2_423_882 and "torch" in s["versions"]
    assert s["eval_examples"] == 20


def test_benchmark_on_a_small_limit_writes_json(tmp_path, mock_manual_dir, monkeypatch):
    manual = mock_manual_dir
    # A 512-square yardstick matmul: 2048's (the CPU default) costs ~6 s of this test's ~45 s.
    monkeypatch.setattr(bench, "matmul_size", lambda: 512)
    with tfds.testing.mock_data(num_examples=64):
        code = bench.main(["--exp", "fmnist_baseline", "--steps", "2", "--repeats", "2",
                           "--batch-size", "16", "--variants",
                           "torch-eager,jax-step-only,jax-xla-default,jax-seeds3",
                           "--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(manual),
                           "--out", str(tmp_path / "speed")])
    assert code == 0
    [path] = (tmp_path / "speed").glob("*.json")
    result = json.loads(path.read_text())
    assert {"machine", "versions", "repeats", "unit", "experiments", "command"} <= set(result)
    assert {"cpu", "cores"} <= set(result["machine"]) and "torch" in result["versions"]
    assert result["matmul_n"] == 512
    exp = result["experiments"]["fmnist_baseline"]
    rows = exp["variants"]
    assert exp["jax_perf"]["xla_cpu"] in ("default", "ynn-reduce", "ynn-off")
    assert set(rows) == {"jax", "torch-eager", "jax-step-only", "jax-xla-default", "jax-seeds3"}
    assert rows["jax-seeds3"]["seed_group"] == "loop"  # the CPU default (perf.seed_group auto)
    assert rows["jax-seeds3"]["group_over_one"] > 0 and "`jax-seeds3` (loop)" in path.with_suffix(".md").read_text()
    for row in rows.values():
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["images_per_s"] > 0
        assert {"per_1000_images_s", "jax_over_this", "warmup_s", "compile_s"} <= set(row)
    assert rows["jax"]["jax_over_this"] == 1.0
    md = path.with_suffix(".md").read_text()
    assert md.count("| fmnist_baseline | jax |") == md.count("| fmnist_baseline | torch-eager |") == 1
    assert "% of peak" in md and result["matmul_peak_gflops"] > 0
    # The input side's share: the step alone on a resident batch is not slower than the epoch.
    share = result["experiments"]["fmnist_baseline"]["input_share"]
    assert -0.5 < share < 1 and "input side" in md


def test_the_patches_stem_variant_runs_the_same_experiment_with_that_stem(monkeypatch):
    """`jax-stem-patches` exists off CPU only (slower than both other stems on XLA:CPU); forced
    here, it times the run's experiment with `perf.stem_conv = "patches"` and records that."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's variant list and stem default")
    assert "jax-stem-patches" not in [v[0] for v in bench.variants(False)]
    monkeypatch.setattr(bench, "variants", lambda cuda, only: [
        (k, *bench.VARIANTS[k]) for k in ("jax", "jax-stem-patches")])
    cfg = config.load("fmnist_baseline").replace(batch_size=16, train_limit=32, eval_limit=16)
    res = bench.bench_experiment(cfg, synthetic_split(32), synthetic_split(16, seed=1), 1, 1,
                                 False, None, log=lambda *_: None)
    rows = res["variants"]
    assert rows["jax"]["perf"]["stem_conv"] == "taps"  # BaselineCNN's CPU default
    assert rows["jax-stem-patches"]["perf"]["stem_conv"] == "patches"
    assert rows["jax-stem-patches"]["median_s"] > 0


def test_a_variant_that_fails_is_recorded_and_the_others_still_timed(monkeypatch):
    """A variant that breaks in its warm-up (say torch.compile on a new card) is named with its
    error in the result; the run goes on with the rest instead of losing the experiment."""
    make = cli.make_trainer

    def broken_torch(framework, *args, **kwargs):
        if framework == "torch":
            raise RuntimeError("no kernel image is available\nsecond line")
        return make(framework, *args, **kwargs)

    monkeypatch.setattr(bench.cli, "make_trainer", broken_torch)
    cfg = config.load("fmnist_baseline").replace(batch_size=16, train_limit=32, eval_limit=16)
    res = bench.bench_experiment(cfg, synthetic_split(32), synthetic_split(16, seed=1), 1, 1,
                                 False, ["jax-xla-default", "torch-eager"], log=lambda *_: None)
    assert set(res["variants"]) == {"jax", "jax-xla-default"}
    assert res["failed"] == {"torch-eager": "RuntimeError: no kernel image is available"}
    md = bench.markdown({"unit": "per 1,000 images", "machine": {"cpu": "x", "cores": 2,
                         "jax_device": "cpu"}, "versions": {}, "repeats": 1, "command": "c",
                         "matmul_peak_gflops": 1.0, "experiments": {"fmnist_baseline": res}})
    assert "fmnist_baseline `torch-eager` failed in its warm-up: RuntimeError" in md


@pytest.mark.parametrize("exp", ["fmnist_baseline", "fmnist_target"])
def test_torch_best_computes_what_the_twin_computes(exp):
    """`torch-best` changes how the step runs (channels_last, fused optimizer, compiled step,
    device-side learning rate and indices), not what it computes: the same initial parameters bit
    for bit, then the same trajectory within float32 tolerance. Plain SGD with a small rate keeps
    rounding differences (fused vs foreach updates, compiled vs eager kernels) proportional; Adam's
    first steps (~lr * sign(g)) would amplify them (see tests/test_seeds.py). Random images: the
    toy splits' near-constant channels make BatchNorm divide by tiny variances, which amplifies
    rounding too."""
    from jaxbench.torch_best import BestTrainer

    def noise(n, seed):
        rng = np.random.default_rng(seed)
        return data.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                          rng.integers(0, 10, n).astype(np.int32))

    cfg = config.load(exp).replace(batch_size=16, image_size=32, epochs=2, optimizer="sgd",
                                   learning_rate=0.01, schedule="cosine")
    train_split, eval_split = noise(64, 0), noise(16, 1)
    twin, best = torch_twin.Trainer(cfg, train_split, eval_split), BestTrainer(cfg, train_split,
                                                                               eval_split)
    states = [twin.init_state(), best.init_state()]
    for a, b in zip(*(t.param_leaves(s) for t, s in zip((twin, best), states))):
        np.testing.assert_array_equal(a, b)
    for epoch in (1, 2):
        out = []
        for trainer, state in zip((twin, best), states):
            _, sums, _ = trainer.train_epoch(state, epoch)
            out.append((trainer.summarize(sums)[0]["loss"], trainer.evaluate(state)[0]["loss"],
                        trainer.lr(state)))
        np.testing.assert_allclose(out[1], out[0], rtol=1e-4)
    final = [np.concatenate([p.ravel() for p in t.param_leaves(s)])
             for t, s in zip((twin, best), states)]
    assert np.linalg.norm(final[1] - final[0]) <= 1e-4 * np.linalg.norm(final[0])
    assert best.record()["torch_best"]["fused_optimizer"]


@pytest.mark.parametrize("exp, optimizer", [("fmnist_target", "adam"),
                                            ("fmnist_baseline", "sgd")])
def test_torch_best_recorded_step_trains_what_the_plain_step_trains(exp, optimizer):
    """On CUDA torch-best records its whole step as a CUDA graph after warm-up steps that change
    the model, BatchNorm statistics and optimizer state, then puts them back. Here the same
    warm-up, restore and replay path runs without the graph (`cuda=False` in RecordedStep): with
    Adam, whose first steps move every weight by ~lr whatever the gradient, and with SGD's
    momentum buffer (the Tiny ImageNet experiments' optimizer), any state the restore missed
    would show. Bit for bit, the recorded trainer trains what the unrecorded one does."""
    from jaxbench.torch_best import WARMUP_STEPS, BestTrainer

    cfg = config.load(exp).replace(batch_size=8, image_size=16, epochs=2, optimizer=optimizer,
                                   momentum=0.9, schedule="cosine", learning_rate=0.01)
    split = synthetic_split(24)
    plain, recorded = (BestTrainer(cfg, split, synthetic_split(8, seed=1)) for _ in range(2))
    recorded.recorded = True
    states = [t.init_state() for t in (plain, recorded)]
    for epoch in (1, 2):
        sums = [t.summarize(t.train_epoch(s, epoch)[1])[0] for t, s in zip((plain, recorded),
                                                                           states)]
        assert sums[0] == sums[1]
    assert states[1].recorded is not None and states[0].recorded is None and WARMUP_STEPS > 0
    for a, b in zip(*(s.optimizer.state.values() for s in states)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if optimizer == "adam":
            assert a["step"].item() == 6  # two epochs of 3 steps: the warm-up's are undone
    for a, b in zip(*(list(s.model.state_dict().values()) for s in states)):
        assert torch.equal(a, b)


def test_torch_best_sets_its_global_flags_only_while_it_runs():
    """cudnn.benchmark and TF32 are process-wide in PyTorch: torch-best sets them (on CUDA)
    around its own calls and restores them, so the plain twin in the same benchmark process keeps
    float32 convolutions and matmuls."""
    from jaxbench.torch_best import BestTrainer

    flags = lambda: (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                     torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    before = flags()
    best = BestTrainer(config.load("fmnist_baseline"), synthetic_split(32), synthetic_split(8))
    best.cuda = True  # what it would do on a GPU; here only the switching is checked
    with best._backend_flags():
        assert flags() == (True, True, True)
    assert flags() == before


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_torch_run_keeps_jax_off_the_gpu(framework):
    """A PyTorch run still starts JAX (the schedule table, the run's record): it must not open
    the GPU, where it would take 75% of the memory before PyTorch asks for any. In a fresh
    process, as `python -m jaxbench.run` starts: the settings land before any backend starts
    (this run stops at a flag error, after them and before any work)."""
    code = ("import os, sys; from jaxbench import run\n"
            f"assert run.main(['--exp', 'fmnist_baseline', '--framework', '{framework}', "
            "'--seed', '1', '--seeds', '0,1']) == 2\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()\n"
            "import jax\n"
            "print(jax.config.jax_platforms, os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "cpu false" if framework == "torch" else "None None"
    assert done.stdout.split("\n")[-2] == expected
