"""The JAX training step: a flax TrainState with BatchNorm statistics, jitted multi-step train/eval.

Pure functions over explicit state; `trainer.Trainer` drives them epoch by epoch. Design, the way
the Flax examples do it, plus what matters for speed at batch 32:
  * The whole uint8 dataset sits on the device; a call gathers its batches by index there, so
    the host sends only int32 indices per step.
  * One jitted call runs `perf.steps_per_call` train steps under `lax.scan` (accelerators), so
    per-step Python and dispatch overhead is paid once per call; with one step per call (the CPU
    default: XLA:CPU runs a step much slower inside a loop body) there is no loop at all.
  * Metrics are summed on the device and fetched once per epoch.
  * Data parallel: a 1-D mesh over all local devices (all processes' devices after
    `jax.distributed.initialize()`); index arrays are sharded along the batch axis, state and the
    uint8 dataset replicated. XLA inserts the gradient and BatchNorm all-reduces, so N devices train
    exactly like one with the same global batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxbench import data, models
from jaxbench.config import Config

# Sums over examples: loss, correct, count (+ steps and first_bad_step in training).
Metrics = dict[str, jax.Array]

class TrainState(train_state.TrainState):
    """flax's TrainState plus the BatchNorm running statistics (empty for BaselineCNN)."""

    batch_stats: Any = struct.field(default_factory=dict)


def make_schedule(cfg: Config, steps_per_epoch: int) -> optax.Schedule:
    if cfg.schedule == "cosine":  # annealed per step to zero over the whole run
        return optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps_per_epoch)
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        return optax.adam(schedule)
    return optax.sgd(schedule, momentum=cfg.momentum)


def create_state(cfg: Config, steps_per_epoch: int, model: Any = None,
                 tx: optax.GradientTransformation | None = None) -> TrainState:
    """Initialize parameters from `cfg.seed`: the same seed gives the same network.

    Pass the same `model` and `tx` objects to get states that fit one compiled step (they are
    static parts of the state's pytree).
    """
    model = model or models.build(cfg.model, cfg.num_classes, cfg.dtype)
    tx = tx or make_optimizer(cfg, make_schedule(cfg, steps_per_epoch))
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    variables = init_variables(model, jax.random.key(cfg.seed), dummy)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


@functools.partial(jax.jit, static_argnums=0)
def init_variables(model: Any, key: jax.Array, dummy: jax.Array) -> Any:
    """`model.init`, compiled: the same numbers as eager init (checked bit for bit), 2-3x sooner
    than dispatching the forward pass op by op, and compiled once for every seed of a group."""
    return model.init(key, dummy, train=False)


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of the convolutions and matrix products in `jaxpr` (2 per multiply-add).

    Read off the traced program, so it is the same number on every backend: XLA's cost analysis
    of a compiled GPU program misses the convolutions it hands to cuDNN, and on the GPU image
    the unoptimized program's cost analysis gave nothing. A convolution counts every tap of its
    window, padding included (output elements x window x input features; the forward pass,
    input gradient and weight gradient alike); elementwise work (BatchNorm, ReLU, the optimizer)
    is left out: under 2% of a train step of either network. A scan's body counts `length`
    times, a cond its costliest branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, out = eqn.primitive.name, eqn.outvars[0].aval
        if name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval, eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * np.prod(out.shape) * rhs.shape[spec[1]] * np.prod(
                [rhs.shape[d] for d in spec[2:]])
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * np.prod(out.shape) * np.prod([lhs.shape[d] for d in contract])
        if name == "cond":
            inner = [max(matmul_flops(b) for b in eqn.params["branches"])]
        else:
            inner = [matmul_flops(v) for v in eqn.params.values() if hasattr(v, "eqns")
                     or hasattr(getattr(v, "jaxpr", None), "eqns")]
        total += sum(inner) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def step_flops(cfg: Config) -> float:
    """FLOPs of one train step of `cfg`'s model at its batch size (`matmul_flops`), counted on
    the plain model (XLA's convolutions, whatever the run's `perf.stem_conv`)."""
    model = models.build(cfg.model, cfg.num_classes)
    state = jax.eval_shape(lambda: create_state(cfg, 1, model))
    x = jax.ShapeDtypeStruct((cfg.batch_size, cfg.image_size, cfg.image_size, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
    return matmul_flops(jax.make_jaxpr(train_step)(state, x, y))


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def zero_metrics(training: bool = False) -> dict[str, np.ndarray]:
    """Metric sums; in training also the step count and the first step whose loss was not finite.

    Host arrays, put on the devices by the caller in one `device_put`. Built as device arrays they
    cost a device-to-host copy each on the way to their sharding: in an H200 trace (2026-11-28,
    197b41e) ~11 ms of idle GPU before every epoch's first kernel, 3% of a 300-step benchmark
    epoch of TargetCNN.
    """
    m = {"loss": np.zeros((), np.float32), "correct": np.zeros((), np.int32),
         "count": np.zeros((), np.int32)}
    if training:
        m |= {"steps": np.zeros((), np.int32), "first_bad_step": np.full((), -1, np.int32)}
    return m


def loss_and_logits(state: TrainState, params: Any, x: jax.Array, y: jax.Array, train: bool):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if train:
        logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    else:
        logits, updates = state.apply_fn(variables, x, train=False), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return loss.mean(), (logits, loss, updates.get("batch_stats", state.batch_stats))


def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, Metrics]:
    """One SGD step on a preprocessed batch: forward, loss, backward, update, BN statistics."""
    grad_fn = jax.value_and_grad(functools.partial(loss_and_logits, state, x=x, y=y, train=True),
                                 has_aux=True)
    (_, (logits, losses, batch_stats)), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, batch_metrics(logits, losses, y, jnp.ones_like(y, bool))


def batch_metrics(logits: jax.Array, losses: jax.Array, y: jax.Array, mask: jax.Array) -> Metrics:
    return {"loss": jnp.sum(losses * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == y) & mask, dtype=jnp.int32),
            "count": jnp.sum(mask, dtype=jnp.int32)}


def add(a: Metrics, b: Metrics) -> Metrics:
    return {k: a[k] + b[k] for k in b} | {k: a[k] for k in a.keys() - b.keys()}


def add_train(sums: Metrics, m: Metrics) -> Metrics:
    """Add a train step's metrics and remember the first step (1-based) with a non-finite loss."""
    sums = add(sums, m)
    steps = sums["steps"] + 1
    first_bad = sums["first_bad_step"]
    first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(m["loss"]), steps, first_bad)
    return sums | {"steps": steps, "first_bad_step": first_bad}


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted multi-step functions for one experiment, closed over normalization constants.

    For a seed group, state and metrics carry a leading seed axis and so does `idx` of `train`
    (each seed its own data order); images, labels and the eval batches are shared.
    """

    train: Callable  # (state, metrics, images, labels, idx[(S,)K,B]) -> (state, metrics)
    evaluate: Callable  # (state, metrics, images, labels, idx[K,B], mask[K,B]) -> metrics


def make_steps(mean: np.ndarray, std: np.ndarray, size: int, group: str | None = None) -> Steps:
    """Jitted train/eval calls; `group` ("vmap" or "unroll", `perf.SEED_GROUPS`) runs them over a
    leading seed axis (`--seeds`)."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def train_one(state, metrics, images, labels, batch_idx):
        x = data.preprocess(images[batch_idx], mean, std, size)
        state, m = train_step(state, x, labels[batch_idx])
        return state, add_train(metrics, m)

    def eval_one(state, metrics, images, labels, batch_idx, mask):
        x = data.preprocess(images[batch_idx], mean, std, size)
        y = labels[batch_idx]
        _, (logits, losses, _) = loss_and_logits(state, state.params, x, y, train=False)
        return add(metrics, batch_metrics(logits, losses, y, mask))

    def train_many(state, metrics, images, labels, idx):
        if idx.shape[0] == 1:  # no loop: the CPU path
            return train_one(state, metrics, images, labels, idx[0])

        # Every step of the scan is a real one: an epoch's tail that does not fill a call runs
        # as its own, shorter, compiled call (`trainer.Trainer`). No padding steps, so no
        # `lax.cond` to skip them: on a GPU its predicate cost a device-to-host copy per step.
        def body(carry, batch_idx):
            return train_one(*carry, images, labels, batch_idx), None

        (state, metrics), _ = jax.lax.scan(body, (state, metrics), idx)
        return state, metrics

    def eval_many(state, metrics, images, labels, idx, mask):
        if idx.shape[0] == 1:
            return eval_one(state, metrics, images, labels, idx[0], mask[0])

        def body(metrics, xs):
            return eval_one(state, metrics, images, labels, *xs), None

        metrics, _ = jax.lax.scan(body, metrics, (idx, mask))
        return metrics

    if group:  # one program, S models
        over = jax.vmap if group == "vmap" else unrolled
        train_many = over(train_many, in_axes=(0, 0, None, None, 0))
        eval_many = over(eval_many, in_axes=(0, 0, None, None, None, None))
    return Steps(train=jax.jit(train_many, donate_argnums=(0, 1)),
                 evaluate=jax.jit(eval_many, donate_argnums=(1,)))


def unrolled(fn: Callable, in_axes: tuple) -> Callable:
    """`fn` over the leading axis of the arguments marked 0, one seed after another in the traced
    program: each seed gets the single-seed computation (on the AMD EPYC tested, losses and
    parameters bit-identical to single runs), where `jax.vmap` batches the seeds into every
    kernel."""

    def run(*args):
        n = next(len(jax.tree.leaves(a)[0]) for a, axis in zip(args, in_axes) if axis == 0)
        outs = [fn(*(jax.tree.map(lambda x: x[i], a) if axis == 0 else a
                     for a, axis in zip(args, in_axes))) for i in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return run


def call_lengths(steps: int, k: int) -> list[int]:
    """The lengths of the calls `steps` train steps run in at k per call: full calls, then the
    tail (`chunks(..., pad=False)`); each length is a compiled program of its own."""
    return [k] * (steps // k) + [steps % k] * bool(steps % k)


def chunks(k: int, *arrays: np.ndarray,
           pad: bool = True) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Split step-major arrays into calls of k steps; yields (real steps, arrays).

    With `pad` the last call is zero-padded to k steps (one static shape, one compilation: the
    eval batches, whose padding a mask zeroes); without, it is shorter (the train steps).
    """
    for start in range(0, len(arrays[0]), k):
        parts = [a[start:start + k] for a in arrays]
        n = len(parts[0])
        if pad and n < k:
            parts = [np.concatenate([p, np.zeros((k - n, *p.shape[1:]), p.dtype)]) for p in parts]
        yield n, parts


def fetch(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (works when other hosts hold replicas too)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def summarize(metrics: Any) -> dict[str, float]:
    m = jax.tree.map(fetch, metrics)
    count = max(int(m["count"]), 1)
    return {"loss": float(m["loss"]) / count, "acc": int(m["correct"]) / count,
            "count": int(m["count"])}
