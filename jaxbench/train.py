"""Training: a flax TrainState with BatchNorm statistics, jitted multi-step train/eval, epoch loop.

Design, the way the Flax examples do it, plus two things that matter for speed at batch 32:
  * The whole uint8 dataset sits on the device; a call gathers its batches by index there, so
    the host sends only int32 indices per step.
  * On accelerators one jitted call runs `steps_per_call` train steps under `lax.scan`, so per-step
    Python and dispatch overhead is paid once per call. On XLA:CPU a loop body runs ~12x slower
    than the same step dispatched alone (measured: BaselineCNN 516 ms vs 42 ms per step), so the
    CPU default is one step per call, where dispatch overhead is negligible next to the step.
  * Metrics are summed on the device and fetched once per epoch.
  * Data parallel: a 1-D mesh over all local devices (all processes' devices after
    `jax.distributed.initialize()`); index arrays are sharded along the batch axis, state and the
    uint8 dataset replicated. XLA inserts the gradient and BatchNorm all-reduces, so N devices train
    exactly like one with the same global batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbench import data, models
from jaxbench.config import Config, ConfigError

Metrics = dict[str, jax.Array]  # sums over examples: loss, correct, count (+ steps, bad in training)

# XLA:CPU hands convolutions, dots, reductions and elementwise ops to YNNPACK fusions by default.
# For these CNNs its convolutions (above all the weight-gradient ones, lowered as convolutions
# with a 64x64 window) split poorly over the cores: the 2-core machine's threads sat idle ~45% of
# a TargetCNN step. Keeping YNNPACK for reductions only (BatchNorm statistics) and leaving the
# convolutions to XLA's own Eigen kernels measured, fwd+bwd at batch 32 on that machine
# (results/speed/xla_cpu_probe.md): TargetCNN 835.7 -> 670.2 ms, BaselineCNN 25.9 -> 21.1 ms;
# YNNPACK off entirely was slower for TargetCNN (922.2 ms). The results differ from the default
# compile's only by float summation order (tests/test_speed_numerics.py).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def compile_lowered(lowered: Any, tuned: bool = True) -> tuple[Any, dict]:
    """Compile with `CPU_COMPILER_OPTIONS` on CPU when `tuned`; plain XLA defaults otherwise.

    Returns the executable and the options it was compiled with ({}: XLA's defaults), so a run
    records what it really used. The option is experimental in XLA: a jaxlib that no longer
    knows it gets the default compile, with a warning, rather than a failed run.
    """
    if not tuned or jax.default_backend() != "cpu":
        return lowered.compile(), {}
    try:
        return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS), CPU_COMPILER_OPTIONS
    except jax.errors.JaxRuntimeError as err:
        warnings.warn(f"XLA rejected {CPU_COMPILER_OPTIONS} ({str(err).splitlines()[0]}); "
                      "compiling with XLA's defaults, which ran slower on CPU.", stacklevel=2)
        return lowered.compile(), {}


class Diverged(RuntimeError):
    """A non-finite training loss; carries where it happened."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"the training loss became NaN or Inf at epoch {epoch}, step {step} of "
                         "that epoch")
        self.epoch, self.step = epoch, step


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
    variables = model.init(jax.random.key(cfg.seed), dummy, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def zero_metrics(training: bool = False) -> Metrics:
    """Metric sums; in training also the step count and the first step whose loss was not finite."""
    m = {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
         "count": jnp.zeros((), jnp.int32)}
    if training:
        m |= {"steps": jnp.zeros((), jnp.int32), "bad": jnp.full((), -1, jnp.int32)}
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
    bad = jnp.where((sums["bad"] < 0) & ~jnp.isfinite(m["loss"]), steps, sums["bad"])
    return sums | {"steps": steps, "bad": bad}


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted multi-step functions for one experiment, closed over normalization constants."""

    train: Callable  # (state, metrics, images, labels, idx[K,B], valid[K]) -> (state, metrics)
    evaluate: Callable  # (state, metrics, images, labels, idx[K,B], mask[K,B]) -> metrics


def make_steps(mean: np.ndarray, std: np.ndarray, size: int) -> Steps:
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

    def train_many(state, metrics, images, labels, idx, valid):
        if idx.shape[0] == 1:  # no loop, no padding: the CPU path
            return train_one(state, metrics, images, labels, idx[0])

        def body(carry, xs):
            state, metrics = carry
            batch_idx, ok = xs

            def step(carry):
                return train_one(*carry, images, labels, batch_idx)

            # Padding steps (the tail of an epoch that does not fill a call) change nothing.
            return jax.lax.cond(ok, step, lambda c: c, (state, metrics)), None

        (state, metrics), _ = jax.lax.scan(body, (state, metrics), (idx, valid))
        return state, metrics

    def eval_many(state, metrics, images, labels, idx, mask):
        if idx.shape[0] == 1:
            return eval_one(state, metrics, images, labels, idx[0], mask[0])

        def body(metrics, xs):
            return eval_one(state, metrics, images, labels, *xs), None

        metrics, _ = jax.lax.scan(body, metrics, (idx, mask))
        return metrics

    return Steps(train=jax.jit(train_many, donate_argnums=(0, 1)),
                 evaluate=jax.jit(eval_many, donate_argnums=(1,)))


def chunks(k: int, *arrays: np.ndarray) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Split step-major arrays into calls of exactly k steps, zero-padding the last call.

    Yields (real steps in this call, padded arrays); one static shape means one compilation.
    """
    for start in range(0, len(arrays[0]), k):
        parts = [a[start:start + k] for a in arrays]
        n = len(parts[0])
        if n < k:
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


@dataclasses.dataclass
class Trainer:
    """Holds an experiment's compiled steps and device-resident data; runs epochs."""

    cfg: Config
    train: data.Split
    test: data.Split
    steps_per_call: int | None = None  # None: 1 on CPU, 50 elsewhere (see the module docstring)
    devices: list | None = None  # None: every device of every process
    tuned: bool = True  # CPU_COMPILER_OPTIONS on CPU; False: XLA's defaults (the benchmark's baseline)

    def __post_init__(self):
        if self.steps_per_call is None:
            self.steps_per_call = 1 if jax.default_backend() == "cpu" else 50
        self.devices = list(self.devices or jax.devices())
        if self.cfg.batch_size % len(self.devices):
            raise ConfigError(f"--batch-size {self.cfg.batch_size} does not split evenly over "
                              f"{len(self.devices)} devices; use a multiple of {len(self.devices)}.")
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batched = NamedSharding(self.mesh, P(None, "data"))  # (steps, batch) index arrays
        self.mean, self.std = data.channel_stats(self.train.images)
        self.steps_per_epoch = len(self.train) // self.cfg.batch_size
        self.schedule = make_schedule(self.cfg, self.steps_per_epoch)
        self.model = models.build(self.cfg.model, self.cfg.num_classes, self.cfg.dtype)
        self.tx = make_optimizer(self.cfg, self.schedule)
        self.k = max(1, min(self.steps_per_call, self.steps_per_epoch))
        self.steps = make_steps(self.mean, self.std, self.cfg.image_size)
        put = functools.partial(jax.device_put, device=self.replicated)
        self.dev = {"train": (put(self.train.images), put(self.train.labels)),
                    "test": (put(self.test.images), put(self.test.labels))}
        # The device holds the images now (on CPU a second copy): drop ours, 1.2 GB for Tiny.
        self.train, self.test = self.train.without_images(), self.test.without_images()
        self.eval_idx, self.eval_mask = data.eval_order(len(self.test), self.cfg.batch_size)
        # Eval follows the train choice: no scan loop where one step per call is faster (CPU).
        self.eval_k = 1 if self.k == 1 else max(1, min(self.k * 4, len(self.eval_idx)))

    def param_count(self, state: TrainState) -> int:
        return param_count(state.params)

    def init_state(self) -> TrainState:
        state = create_state(self.cfg, self.steps_per_epoch, self.model, self.tx)
        return jax.device_put(state, self.replicated)

    def shard(self, a: np.ndarray) -> jax.Array:
        """A global (steps, batch) array, sharded along the batch; each process gives its columns."""
        if jax.process_count() == 1:
            return jax.device_put(a, self.batched)
        local = np.split(a, jax.process_count(), axis=1)[jax.process_index()]
        return jax.make_array_from_process_local_data(self.batched, local, a.shape)

    checkpointable = True  # its state is a pytree that orbax saves and restores exactly

    def zero_sums(self) -> Metrics:
        return jax.device_put(zero_metrics(training=True), self.replicated)

    summarize = staticmethod(summarize)

    def compile(self, state: TrainState) -> float:
        """Compile both steps ahead of time; return the seconds it took (reported apart)."""
        t0 = time.perf_counter()
        b = self.cfg.batch_size
        idx = self.shard(np.zeros((self.k, b), np.int32))
        valid = jax.device_put(np.ones(self.k, bool), self.replicated)
        self.train_fn, self.compiler_options = compile_lowered(
            self.steps.train.lower(state, self.zero_sums(), *self.dev["train"], idx, valid),
            self.tuned)
        eidx = self.shard(np.zeros((self.eval_k, b), np.int32))
        self.eval_fn, _ = compile_lowered(self.steps.evaluate.lower(
            state, self.eval_zero(), *self.dev["test"], eidx,
            self.shard(np.ones((self.eval_k, b), bool))), self.tuned)
        return time.perf_counter() - t0

    def train_epoch(self, state: TrainState, epoch: int, sums: Metrics | None = None,
                    start: int = 0, progress: Callable[[int], None] = lambda n: None,
                    stop: Callable[[], bool] = lambda: False) -> tuple[TrainState, Metrics, int]:
        """Train epoch `epoch` from its step `start`; return (state, sums, steps done in it).

        Returns early, between calls, when `stop()` turns true; raises `Diverged` at the first
        non-finite loss (checked once per call, where the host syncs for progress anyway).
        """
        order = data.epoch_order(self.cfg.seed, epoch, len(self.train), self.cfg.batch_size)
        sums = self.zero_sums() if sums is None else sums
        done = start
        # Sync with the device every ~32 steps only: in between, Python enqueues the next steps
        # while XLA runs the current one (async dispatch). A sync is the NaN check and the
        # progress update; `bad` names the exact first bad step whenever it is looked at.
        sync_every = max(1, 32 // self.k)
        pending = 0
        for call, (n, (idx,)) in enumerate(chunks(self.k, order[start:]), 1):
            if stop():
                break
            valid = jax.device_put(np.arange(self.k) < n, self.replicated)
            state, sums = self.train_fn(state, sums, *self.dev["train"], self.shard(idx), valid)
            done += n
            pending += n
            if call % sync_every == 0:
                self._check(sums, epoch)
                progress(pending * self.cfg.batch_size)
                pending = 0
        self._check(sums, epoch)  # also before a Ctrl-C checkpoint: never save a diverged state
        progress(pending * self.cfg.batch_size)
        return state, sums, done

    @staticmethod
    def _check(sums: Metrics, epoch: int) -> None:
        bad = int(fetch(sums["bad"]))
        if bad >= 0:
            raise Diverged(epoch, bad)

    def eval_zero(self) -> Metrics:
        return jax.device_put(zero_metrics(), self.replicated)

    def evaluate(self, state: TrainState) -> dict:
        metrics = self.eval_zero()
        for _, (idx, mask) in chunks(self.eval_k, self.eval_idx, self.eval_mask):
            metrics = self.eval_fn(state, metrics, *self.dev["test"], self.shard(idx),
                                   self.shard(mask))
        return summarize(metrics)

    def checkpoint_tree(self, state: TrainState, sums: Metrics) -> dict:
        return {"state": state, "sums": sums}

    def global_step(self, state: TrainState) -> int:
        return int(fetch(state.step))

    def param_leaves(self, state: TrainState) -> list[np.ndarray]:
        return [fetch(x) for x in jax.tree.leaves(state.params)]

    def lr(self, state: TrainState) -> float:
        """The learning rate of the last step taken."""
        return float(self.schedule(max(self.global_step(state) - 1, 0)))
