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
    """The scan path (accelerators' default) trains exactly like one step per call."""
    cfg = small(epochs=1)
    results = []
    for k in (1, 3):  # 320 // 16 = 20 steps: 3 per call leaves a padded last call
        trainer = Trainer(cfg.replace(steps_per_call=k), synthetic_split(320),
                          synthetic_split(50, seed=1))
        results.append(loop.fit(cfg, trainer, tmp_path / str(k)))
    np.testing.assert_allclose(results[0]["final_eval_loss"], results[1]["final_eval_loss"],
                               rtol=1e-4)


def test_cosine_schedule_reaches_zero_at_the_end():
    cfg = small("tiny_baseline", epochs=2)
    trainer = Trainer(cfg, synthetic_split(64, shape=(64, 64, 3), classes=200),
                      synthetic_split(16, shape=(64, 64, 3), classes=200))
    assert trainer.schedule(0) == cfg.learning_rate
    assert abs(float(trainer.schedule(trainer.steps_per_epoch * 2))) < 1e-9
