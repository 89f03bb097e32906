"""Data parallelism: two (forced host) devices train like one, BatchNorm statistics and seed
groups included."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import synthetic_split
from jaxbench import config
from jaxbench.train import fetch
from jaxbench.trainer import Trainer

assert jax.device_count() == 2, jax.devices()
out = {}
# SGD with momentum and the cosine schedule, XLA's default compile (this test is about the mesh,
# not the compile choice), 16x16 images (the mesh does not care; TargetCNN's four blocks still
# pool them to 2x2).
cfg = config.load("fmnist_target").replace(epochs=2, batch_size=16, optimizer="sgd",
                                           learning_rate=0.01, schedule="cosine",
                                           xla_cpu="default", image_size=16)
for n in (1, 2):
    t = Trainer(cfg, synthetic_split(96), synthetic_split(40, seed=1), devices=jax.devices()[:n])
    t.compile(t.init_state())
    # One step: the loss, the update and the BatchNorm running statistics themselves. The first
    # step of SGD with momentum is plain SGD's, -lr * g (Adam's first step is lr * sign(g),
    # which flips on float noise wherever a gradient entry is ~0 and would hide how closely the
    # gradients agree).
    state = t.init_state()
    start = [fetch(x).ravel()[:64] for x in jax.tree.leaves(state.params)]
    calls = iter(range(2))
    state, sums, done = t.train_epoch(state, 1, stop=lambda: next(calls) > 0)
    assert done == 1
    out[f"step{n}"] = {
        "losses": [t.summarize(sums)[0]["loss"], t.evaluate(state)[0]["loss"]],
        "stats": [fetch(x).tolist() for x in jax.tree.leaves(state.batch_stats)][:4],
        "updates": [(fetch(x).ravel()[:64] - p0).tolist()
                    for x, p0 in zip(jax.tree.leaves(state.params), start)],
        "sharding": str(state.params["Conv_0"]["kernel"].sharding.spec),
        "devices": len(state.params["Conv_0"]["kernel"].sharding.device_set)}
    # A trajectory: 2 epochs of 6 steps, from the same start, with the same compiled step.
    state, losses = t.init_state(), []
    for epoch in range(1, cfg.epochs + 1):
        state, sums, _ = t.train_epoch(state, epoch)
        losses += [t.summarize(sums)[0]["loss"], t.evaluate(state)[0]["loss"]]
    out[f"run{n}"] = {"losses": losses}
# A seed group on a mesh, looped (a list of states; the CPU default) and vmapped (a leading seed
# axis, independent of the batch-sharded device axis; the accelerator default). On two devices
# in calls of 4 steps, as on accelerators: 6 steps per epoch are a call of 4 and a tail of 2;
# then epoch 3 resumed at its step 1, a call of 4 and a tail of 1 compiled when first met (on
# one device one step per call: the number of steps per call does not change the numbers).
# BaselineCNN to keep it short: tests/test_seeds.py checks TargetCNN groups seed by seed, and
# that one device's vmapped group trains each seed like its own run (so vmap on one device is
# not run again here: two devices' vmap is checked against one device's loop).
cfg = config.load("fmnist_baseline").replace(epochs=2, batch_size=16, optimizer="sgd",
                                             learning_rate=0.01, schedule="cosine",
                                             xla_cpu="default", image_size=32)
for n, group in ((1, "loop"), (2, "loop"), (2, "vmap")):
    k = 1 if n == 1 else 4
    t = Trainer(cfg.replace(seed_group=group, steps_per_call=k), synthetic_split(96),
                synthetic_split(40, seed=1), devices=jax.devices()[:n], seeds=(0, 1))
    state = t.init_state()
    t.compile(state)
    assert sorted(t.train_fns) == ([1] if k == 1 else [2, 4]), sorted(t.train_fns)
    losses = []
    for epoch in range(1, cfg.epochs + 1):
        state, sums, _ = t.train_epoch(state, epoch)
        losses += [m["loss"] for m in t.summarize(sums)] + [m["loss"] for m in t.evaluate(state)]
    state, sums, done = t.train_epoch(state, 3, start=1)
    assert done == 6 and sorted(t.train_fns) == ([1] if k == 1 else [1, 2, 4])
    assert [m["count"] for m in t.summarize(sums)] == [5 * 16] * 2
    losses += [m["loss"] for m in t.summarize(sums)]
    out[f"{group}{n}"] = {"losses": losses}
print(json.dumps(out))
"""


def test_two_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["step2"]["devices"] == 2 and out["step2"]["sharding"] in ("P()", "PartitionSpec()")
    one, two = out["step1"], out["step2"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    for a, b in zip(one["stats"], two["stats"]):  # BatchNorm running mean / var after the step
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # Each tensor's update (-lr * its gradient), relative to its norm: BatchNorm's backward cancels
    # terms, so the two-device reduction order moves a tensor's update by up to 1.8e-4 of its norm
    # at 16x16 (median 6e-7), up to ~5e-3 (median 7e-4) at 32x32, on these noise images.
    for a, b in zip(one["updates"], two["updates"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(b - a) <= 2e-2 * np.linalg.norm(a) + 1e-8, (a, b)
    np.testing.assert_allclose(out["run2"]["losses"], out["run1"]["losses"], rtol=1e-3)
    # The seed groups: two devices like one, and their two seeds really differ.
    for group in ("loop", "vmap"):
        np.testing.assert_allclose(out[f"{group}2"]["losses"], out["loop1"]["losses"], rtol=1e-3)
        assert out[f"{group}2"]["losses"][0] != out[f"{group}2"]["losses"][1]
