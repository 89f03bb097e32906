import json

import numpy as np

from jaxbench import config, loop
from jaxbench.trainer import Trainer
from conftest import synthetic_split


def small(exp="fmnist_baseline", **over):
    return config.load(exp).replace(**{"epochs": 2, "batch_size": 16, **over})


def test_same_seed_gives_identical_metrics(tmp_path):
    cfg = small("fmnist_target", image_size=32)  # BatchNorm and all, at a quarter of the cost
    rows = []
    for name in ("a", "b"):
        trainer = Trainer(cfg, synthetic_split(64), synthetic_split(40, seed=1))
        loop.fit(cfg, trainer, tmp_path / name)
        rows.append([json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    keys = ("train_loss", "train_acc", "eval_loss", "eval_acc", "lr")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def test_a_different_seed_gives_different_metrics(tmp_path):
    out = []
    for seed in (0, 1):
        cfg = small(seed=seed, epochs=1)
        out.append(loop.fit(cfg, Trainer(cfg, synthetic_split(64), synthetic_split(40)), tmp_path / str(seed)))
    assert out[0]["final_eval_loss"] != out[1]["final_eval_loss"]


def test_training_learns_and_eval_counts_every_example(tmp_path):
    cfg = small(epochs=3)
    trainer = Trainer(cfg, synthetic_split(320), synthetic_split(50, seed=1))
    summary = loop.fit(cfg, trainer, tmp_path)
    assert summary["best_eval_acc"] > 0.5  # 10 classes: chance is 0.1
    [ev] = trainer.evaluate(trainer.init_state())  # 4 batches of 16, the last padded and masked
    assert ev["count"] == 50


def test_multi_step_calls_match_single_steps(tmp_path):
    """The scan path (accelerators' default) trains exactly like one step per call, an epoch's
    tail included: 320 // 16 = 20 steps, 3 per call leave a tail of 2, a call of its own. Then
    an epoch resumed at its step 1: six calls of 3 and a tail of 1, compiled ahead with the
    others once `adopt` has read the checkpoint's progress (tests/test_parallel.py has a tail
    compiled when first met)."""
    cfg = small(epochs=1, xla_cpu="default")
    results, compiled, params = [], [], []
    for k in (1, 3):
        trainer = Trainer(cfg.replace(steps_per_call=k), synthetic_split(320),
                          synthetic_split(50, seed=1))
        results.append(loop.fit(cfg, trainer, tmp_path / str(k)))
        compiled.append(sorted(trainer.train_fns))
        trainer.adopt({"epoch": 0, "step_in_epoch": 1})
        trainer.compile(trainer.init_state())
        compiled.append(sorted(trainer.train_fns))
        fns = dict(trainer.train_fns)
        state, sums, done = trainer.train_epoch(trainer.init_state(), 0, start=1)
        assert done == 20 and trainer.summarize(sums)[0]["count"] == 19 * 16
        assert trainer.train_fns == fns  # nothing compiled inside the timed epoch
        params.append(trainer.param_leaves(state))
    assert compiled == [[1], [1], [2, 3], [1, 2, 3]]
    np.testing.assert_allclose(results[0]["final_eval_loss"], results[1]["final_eval_loss"],
                               rtol=1e-4)
    for a, b in zip(*params):  # float32 summation order apart (XLA fuses a scan body its own way)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def test_train_calls_have_no_per_step_condition():
    """No padding steps, so no `lax.cond` in the loop: on a GPU a condition's predicate is copied
    to the host every step, and the step waits for it."""
    # XLA's stem convolution: the CPU's taps stem has a `lax.cond` of its own (models.tap_conv).
    cfg = small(steps_per_call=3, stem_conv="xla", xla_cpu="default")
    trainer = Trainer(cfg, synthetic_split(320), synthetic_split(50, seed=1))
    state = trainer.init_state()
    text = trainer.programs.train.lower(
        state, trainer.zero_sums(), *trainer.images["train"],
        trainer.shard(np.zeros((3, 16), np.int32))).as_text()
    assert "stablehlo.while" in text  # the scan is there ...
    assert "stablehlo.case" not in text and "stablehlo.if" not in text  # ... and no condition


def test_cosine_schedule_reaches_zero_at_the_end():
    cfg = small("tiny_baseline", epochs=2)
    trainer = Trainer(cfg, synthetic_split(64, shape=(64, 64, 3), classes=200),
                      synthetic_split(16, shape=(64, 64, 3), classes=200))
    assert trainer.schedule(0) == cfg.learning_rate
    assert abs(float(trainer.schedule(trainer.steps_per_epoch * 2))) < 1e-9


def test_the_nan_check_reads_a_flag_only_after_the_next_call_is_dispatched(monkeypatch):
    """With 32 or more steps per call (accelerators) every call is a sync point. The host reads
    the previous call's `first_bad_step` after dispatching the next call, so the device always
    has a call queued: reading a call's own flag right after dispatching it would idle the device
    from that call's end until the host has dispatched the next (an H200 trace showed 3-4 ms of
    idle per 50-step call). The last flag is read before the epoch returns."""
    from jaxbench import trainer as trainer_mod

    cfg = small(epochs=1, steps_per_call=32, batch_size=2, image_size=16, xla_cpu="default")
    trainer = Trainer(cfg, synthetic_split(192), synthetic_split(8, seed=1))  # 96 steps: 3 calls
    state = trainer.init_state()
    trainer.compile(state)
    events = []
    real_fetch = trainer_mod.fetch
    monkeypatch.setattr(trainer_mod, "fetch", lambda x: events.append("read") or real_fetch(x))
    for n, fn in list(trainer.train_fns.items()):
        trainer.train_fns[n] = lambda *a, fn=fn: events.append("call") or fn(*a)
    trainer.train_epoch(state, 0)
    assert events == ["call", "call", "read", "call", "read", "read"]


def test_metric_sums_start_on_the_host():
    """Every epoch starts from zero sums. Made as device arrays, each would be copied back to the
    host on its way to the mesh (`Trainer._replicate`): in an H200 profiler trace that kept the
    GPU idle ~11 ms before each epoch's first kernel. Host arrays go to the devices in one put."""
    from jaxbench.train import zero_metrics

    for training, keys in ((False, {"loss", "correct", "count"}),
                           (True, {"loss", "correct", "count", "steps", "first_bad_step"})):
        sums = zero_metrics(training)
        assert set(sums) == keys
        assert all(type(v) is np.ndarray and v.shape == () for v in sums.values())
        assert sums["loss"].dtype == np.float32 and sums["count"].dtype == np.int32
    assert zero_metrics(True)["first_bad_step"] == -1 and zero_metrics(True)["steps"] == 0
    cfg = small(image_size=16, xla_cpu="default")
    trainer = Trainer(cfg, synthetic_split(32), synthetic_split(8, seed=1))
    sums = trainer.zero_sums()
    assert all(v.sharding == trainer.replicated for v in sums.values())
    assert int(sums["first_bad_step"]) == -1
