"""`--seeds`: a seed group trains each seed as `--seed S` alone would."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import config, data, loop, run
from jaxbench.train import fetch
from jaxbench.trainer import Trainer
from conftest import synthetic_split


def train(trainer: Trainer, epochs: int):
    """Train directly; return the state and per-epoch [train loss per seed, eval loss per seed]."""
    state = trainer.init_state()
    trainer.compile(state)
    curves = []
    for epoch in range(1, epochs + 1):
        state, sums, _ = trainer.train_epoch(state, epoch)
        curves.append([m["loss"] for m in trainer.summarize(sums)]
                      + [m["loss"] for m in trainer.evaluate(state)])
    return state, curves


def leaves(tree):
    return [np.asarray(fetch(x), np.float64) for x in jax.tree.leaves(tree)]


def noise_split(n: int, seed: int) -> data.Split:
    """Random images and labels: BatchNorm sees well-spread channels (no near-zero variances)."""
    rng = np.random.default_rng(seed)
    return data.Split(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                      rng.integers(0, 10, n).astype(np.int32))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.zeros(0)] + [x.ravel() for x in leaves(tree)])


def equivalence_config(exp: str, batch: int, size: int, xla_cpu: str) -> config.Config:
    return config.load(exp).replace(epochs=2, batch_size=batch, optimizer="sgd", learning_rate=0.01,
                                    image_size=size, xla_cpu=xla_cpu)


@functools.lru_cache(maxsize=None)
def single_run(exp: str, n_train: int, batch: int, size: int, xla_cpu: str, seed: int):
    """`--seed S` alone: per-epoch losses, final parameters and BatchNorm statistics (computed once
    and shared by the loop, vmap and unroll cases)."""
    cfg = equivalence_config(exp, batch, size, xla_cpu).replace(seed=seed)
    state, curves = train(Trainer(cfg, noise_split(n_train, 0), noise_split(16, 1)), 2)
    return curves, flat(state.params), flat(state.batch_stats)


@pytest.mark.parametrize("exp, n_train, batch, size, xla_cpu, seed_group, loss_rtol, params_rtol", [
    ("fmnist_baseline", 192, 32, 64, "auto", "vmap", 1e-5, 1e-4),
    # Slow (30 s of a vmapped TargetCNN on CPU): run with -m slow.
    pytest.param("fmnist_target", 24, 8, 64, "auto", "vmap", 1e-4, 1e-4, marks=pytest.mark.slow),
    # `unroll` is nobody's default: its cases run with -m slow.
    pytest.param("fmnist_baseline", 192, 32, 64, "auto", "unroll", 1e-6, 1e-6,
                 marks=pytest.mark.slow),
    pytest.param("fmnist_target", 24, 8, 64, "auto", "unroll", 1e-6, 1e-6, marks=pytest.mark.slow),
    ("fmnist_baseline", 192, 32, 64, "auto", "loop", 0, 0),
    # `loop` is exact at any size and under any compile: 32x32 and XLA's default compile (no
    # self-check's compiles) take half the time. The bounds of the other cases were measured at
    # 64x64; at 32x32 BatchNorm's last blocks see 4x fewer values per channel.
    ("fmnist_target", 24, 8, 32, "default", "loop", 0, 0),
])
def test_each_seed_of_a_group_trains_like_its_single_seed_run(exp, n_train, batch, size, xla_cpu,
                                                              seed_group, loss_rtol, params_rtol):
    """Same start (bit for bit), same data order, same trajectory within float32 tolerance.

    `loop` (the CPU default) calls the very executable a single-seed run compiles, on each seed's
    own arrays: bit-identical, so its bounds are 0.

    `unroll` traces the single-seed step once per seed: the same operations on
    the same numbers. On an AMD EPYC its losses and parameters were bit-identical to the single
    runs and TargetCNN's BatchNorm statistics 1-2 ulp off (XLA fuses the running-average update
    differently in the larger program); the bounds (1e-6 relative) leave room for such fusion
    choices on other CPUs and nothing more.

    `vmap` is not bit-identical in general: it makes each convolution one batched convolution, and the
    compile may pick kernels that sum in another order (with XLA's default compile on an AMD
    EPYC the BaselineCNN group was bit-identical; with `ynn-reduce` / `ynn-off`, after 2 epochs,
    its losses differed by ~1e-7 relative and its parameters by ~1e-6 of their norm). Plain SGD
    at a small learning rate keeps such rounding differences proportional (update -lr * g);
    Adam's first steps are ~lr * sign(g) and a large rate makes training chaotic, either of
    which would amplify them and hide how close the two computations are. Single tensors whose
    gradient is a sum that cancels to near zero (a BatchNorm bias before the next BatchNorm)
    differ by up to a few percent of their own tiny norm, so the parameters and the BatchNorm
    statistics are compared as whole vectors: measured ~1e-6 relative, bound 1e-4. Losses:
    measured <= 2e-5 (TargetCNN, batch 8) and ~1e-7 (BaselineCNN), bounds 1e-4 and 1e-5.
    """
    cfg = equivalence_config(exp, batch, size, xla_cpu).replace(seed_group=seed_group)
    train_split, eval_split = noise_split(n_train, 0), noise_split(16, 1)
    group = Trainer(cfg, train_split, eval_split, seeds=(3, 5))
    assert group.perf.seed_group == seed_group
    for i, seed in enumerate((3, 5)):  # initialized exactly as --seed S would be
        single = Trainer(cfg.replace(seed=seed), train_split, eval_split)
        for a, b in zip(leaves(single.init_state().params),
                        leaves(group.member(group.init_state(), i).params)):
            np.testing.assert_array_equal(a, b)
    group_state, group_curves = train(group, 2)
    for i, seed in enumerate((3, 5)):
        curves, params, stats = single_run(exp, n_train, batch, size, xla_cpu, seed)
        for epoch in range(2):
            ours = [group_curves[epoch][i], group_curves[epoch][2 + i]]
            np.testing.assert_allclose(ours, curves[epoch], rtol=loss_rtol)
        member = group.member(group_state, i)
        for a, b in ((params, flat(member.params)), (stats, flat(member.batch_stats))):
            assert np.linalg.norm(a - b) <= params_rtol * np.linalg.norm(a), np.linalg.norm(a - b)
    # The two seeds really differ (different init and data order).
    assert group_curves[-1][0] != group_curves[-1][1]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "fmnist.npz"
    data.save_arrays(path, "fashion_mnist", synthetic_split(256), synthetic_split(64, seed=1))
    return path


def test_a_group_run_writes_one_folder_per_seed_and_a_group_summary(arrays, tmp_path, capsys):
    code = run.main(["--exp", "fmnist_baseline", "--arrays", str(arrays), "--epochs", "2",
                     "--seeds", "0,2", "--out", str(tmp_path)])
    assert code == 0
    out = tmp_path / "fmnist_baseline"
    finals = []
    for seed in (0, 2):
        s = json.loads((out / f"seed{seed}" / "summary.json").read_text())
        rows = [json.loads(l) for l in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2] and s["config"]["seed"] == seed
        assert s["final_eval_acc"] == rows[-1]["eval_acc"] and len(s["params_sha256"]) == 64
        assert s["seed_group"] == [0, 2]
        finals.append(s["final_eval_acc"])
    group = json.loads((out / "summary.json").read_text())
    assert group["kind"] == "seed_group" and group["seeds"] == [0, 2]
    assert group["final_eval_acc"]["values"] == finals
    assert group["final_eval_acc"]["mean"] == pytest.approx(np.mean(finals))
    assert group["final_eval_acc"]["std"] == pytest.approx(np.std(finals, ddof=1))
    assert len(group["mean_curves"]["eval_acc"]) == 2 and group["group_epoch_time_s"] > 0
    assert "seed group [0, 2]" in capsys.readouterr().out


def test_the_twin_runs_a_group_one_seed_after_another(arrays, tmp_path):
    pytest.importorskip("torch")
    code = run.main(["--exp", "fmnist_baseline", "--arrays", str(arrays), "--epochs", "1",
                     "--framework", "torch", "--seeds", "2", "--out", str(tmp_path)])
    assert code == 0
    out = tmp_path / "fmnist_baseline_torch"
    assert {p.name for p in out.iterdir()} >= {"seed0", "seed1", "summary.json"}
    group = json.loads((out / "summary.json").read_text())
    assert group["seeds"] == [0, 1] and group["framework"] == "torch"
    assert group["group_epoch_time_s"] == pytest.approx(
        sum(json.loads((out / f"seed{s}" / "summary.json").read_text())["mean_epoch_time_s"]
            for s in (0, 1)))


@pytest.mark.parametrize("seed_group", ["loop", "unroll"])  # a list of states; one stacked state
def test_a_nan_in_one_seed_stops_the_group_naming_it(tmp_path, monkeypatch, seed_group):
    cfg = config.load("fmnist_baseline").replace(epochs=2, batch_size=32, seed_group=seed_group)
    trainer = Trainer(cfg, synthetic_split(128), synthetic_split(32, seed=1), seeds=(0, 1, 2))
    original = trainer.train_epoch

    def poisoned(state, epoch, *args, **kwargs):  # seed 1 (index 1) gets NaN weights in epoch 2
        if epoch == 2 and trainer.looped:
            state[1] = state[1].replace(params=jax.tree.map(lambda p: p * jnp.nan, state[1].params))
        elif epoch == 2:
            poison = jnp.asarray([1.0, jnp.nan, 1.0])
            state = state.replace(params=jax.tree.map(
                lambda p: p * poison.reshape(3, *([1] * (p.ndim - 1))), state.params))
        return original(state, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", poisoned)
    with pytest.raises(loop.Diverged, match="seed 1 became NaN or Inf at epoch 2, step 1") as err:
        loop.fit(cfg, trainer, tmp_path)
    assert err.value.seed == 1


@pytest.mark.parametrize("value", ["0,0", "-1,2", "0", "a,b"])
def test_bad_seed_lists_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--exp", "fmnist_baseline", "--seeds", value])
    assert exit_.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_seed_and_seeds_together_exit_2(capsys):
    assert run.main(["--exp", "fmnist_baseline", "--seed", "1", "--seeds", "0,1"]) == 2
    assert "--seed and --seeds" in capsys.readouterr().err


def test_a_lone_number_is_a_count_and_a_trailing_comma_makes_a_list():
    from jaxbench.cli import seed_list

    assert seed_list("3") == (0, 1, 2) and seed_list("1") == (0,)
    assert seed_list("1,") == (1,) and seed_list("2,0") == (2, 0)


def test_a_group_assembled_from_separate_programs_sums_each_seeds_share():
    """The suite's runs of one experiment may be a group of seeds 0 and 1 (30 s per epoch, the
    group's, in each seed's summary) and seed 2 alone (12 s): one epoch of all three is 42 s."""
    from jaxbench import outputs

    def summary(seed, secs, **extra):
        return {"experiment": "fmnist_baseline", "framework": "jax", "config": {"seed": seed},
                "final_eval_acc": 0.9, "best_eval_acc": 0.9, "mean_epoch_time_s": secs, **extra}

    rows = [[{k: 0.5 for k in outputs.CURVE_KEYS}]] * 3
    parts = [summary(0, 30.0, seed_group=[0, 1]), summary(1, 30.0, seed_group=[0, 1]),
             summary(2, 12.0)]
    group = outputs.group_summary(parts, rows, separate=True)
    assert group["group_epoch_time_s"] == 42.0 and group["epoch_time_per_seed_s"] == 14.0
    assert outputs.group_summary(parts[:2], rows[:2])["group_epoch_time_s"] == 30.0  # one program
    twin = [summary(s, 20.0, seed_group=[0, 1], sequential=True) for s in (0, 1)]
    assert outputs.group_summary(twin, rows[:2])["group_epoch_time_s"] == 40.0  # one by one
