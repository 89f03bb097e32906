"""The JAX side of the trainer contract (`loop.Trainer`): device-resident data, compiled steps.

Data parallel: a 1-D mesh over all devices (all processes' devices after
`jax.distributed.initialize()`); index arrays are sharded along the batch axis, state and the
uint8 dataset replicated. XLA inserts the gradient and BatchNorm all-reduces, so N devices train
exactly like one with the same global batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxbench import data, distributed, models, perf
from jaxbench.config import Config, ConfigError
from jaxbench.loop import Diverged
from jaxbench.train import (Metrics, TrainState, call_lengths, chunks, create_state, fetch,
                            make_optimizer, make_schedule, make_steps, param_count, summarize,
                            zero_metrics)


class Trainer:
    """Holds an experiment's compiled steps and device-resident data; runs epochs.

    `seeds` (`--seeds`) trains a seed group, each seed initialized and shuffled exactly as
    `--seed S` would be (`perf.seed_group`): vmapped or unrolled, as one program over a leading
    seed axis on every leaf of the state; looped, as a list of single-seed states, each stepped
    by the single-seed program in turn (XLA:CPU runs that fastest, no slower than the seeds as
    separate runs). The seeds are independent of the mesh: batches are sharded over
    devices along their batch axis as for one seed.
    `perf_record` (a resumed run's `Resolved.to_dict()`) reuses that run's speed decisions, so
    a resume compiles exactly the program the interrupted run used.
    """

    checkpointable = True  # its state is a pytree that orbax saves and restores exactly

    def __init__(self, cfg: Config, train: data.Split, test: data.Split,
                 devices: list | None = None, perf_record: dict | None = None,
                 seeds: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.grouped = seeds is not None
        self.seeds = tuple(seeds) if self.grouped else (cfg.seed,)
        devices = list(devices or jax.devices())
        if cfg.batch_size % len(devices):
            raise ConfigError(f"--batch-size {cfg.batch_size} does not split evenly over "
                              f"{len(devices)} devices; use a multiple of {len(devices)}.")
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        # (steps, batch) index arrays; a group's train indices are (seeds, steps, batch).
        self.batched = NamedSharding(self.mesh, P(None, "data"))
        self.seed_batched = NamedSharding(self.mesh, P(None, None, "data"))
        self.train_size, self.eval_size = len(train), len(test)
        self.steps_per_epoch = data.steps_per_epoch(self.train_size, cfg.batch_size)
        self.mean, self.std = data.channel_stats(train.images)
        self.schedule = make_schedule(cfg, self.steps_per_epoch)
        self.tx = make_optimizer(cfg, self.schedule)
        put = functools.partial(jax.device_put, device=self.replicated)
        # Only the device keeps the images (on CPU a second copy): the caller may drop its own.
        self.images = {"train": (put(train.images), put(train.labels)),
                       "eval": (put(test.images), put(test.labels))}
        self.eval_idx, self.eval_mask = data.eval_order(self.eval_size, cfg.batch_size)
        self.train_fns: dict[int, Any] = {}  # steps in the call -> compiled call (`compile`)
        self.eval_fn = None
        self.compile_time_s = 0.0
        self.resume_start = 0  # the step of its epoch a resumed run starts at (`adopt`)
        self.use(distributed.agree_perf(perf.resolve(
            cfg.perf, jax.default_backend(), cfg.model, cfg.num_classes,
            cfg.batch_size // len(devices), cfg.image_size, perf_record)))

    def use(self, resolved: perf.Resolved) -> None:
        """Take these speed settings: the model's stem, steps per call, the compile options."""
        self.perf = resolved
        self.looped = self.grouped and resolved.seed_group == "loop"
        self.programs = make_steps(self.mean, self.std, self.cfg.image_size,
                                   group=resolved.seed_group if self.grouped and not self.looped
                                   else None)
        self.model = models.build(self.cfg.model, self.cfg.num_classes, resolved.dtype,
                                  resolved.stem_conv)
        self.steps_per_call = max(1, min(resolved.steps_per_call, self.steps_per_epoch))
        # Eval follows the train choice: no scan loop where one step per call is faster (CPU).
        self.eval_steps_per_call = (1 if self.steps_per_call == 1 else
                                    max(1, min(self.steps_per_call * 4, len(self.eval_idx))))

    def adopt(self, progress: dict) -> None:
        """A resumed run compiles what the interrupted run compiled (its recorded decisions),
        and the call that finishes the epoch it resumes in."""
        self.resume_start = int(progress.get("step_in_epoch", 0))
        if "perf" in progress:
            self.use(perf.resolve(self.cfg.perf, jax.default_backend(), self.cfg.model,
                                  self.cfg.num_classes, self.cfg.batch_size, self.cfg.image_size,
                                  progress["perf"]))

    def member(self, tree: Any, i: int) -> Any:
        """Seed i's part of a (grouped) pytree; the tree itself for a single seed."""
        if self.looped:
            return tree[i]
        return jax.tree.map(lambda x: x[i], tree) if self.grouped else tree

    def param_count(self, state: TrainState) -> int:
        return param_count(self.member(state, 0).params)

    def init_state(self) -> TrainState:
        states = [create_state(self.cfg.replace(seed=s), self.steps_per_epoch, self.model, self.tx)
                  for s in self.seeds]
        if self.looped:
            return [self._replicate(s) for s in states]
        state = jax.tree.map(lambda *xs: np.stack(xs), *states) if self.grouped else states[0]
        return self._replicate(state)

    def _replicate(self, tree: Any) -> Any:
        """`tree` on every device of the mesh. Put from host values: with several processes,
        jax 0.10.2's device_put of a jax.Array builds arrays whose shards orbax cannot read."""
        return jax.device_put(jax.tree.map(np.asarray, tree), self.replicated)

    def shard(self, a: np.ndarray) -> jax.Array:
        """A global (..., steps, batch) array sharded along the batch; each process gives its part."""
        sharding = self.seed_batched if a.ndim == 3 else self.batched
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        local = np.split(a, jax.process_count(), axis=-1)[jax.process_index()]
        return jax.make_array_from_process_local_data(sharding, local, a.shape)

    def _per_seed(self, tree: Any) -> Any:
        """`tree` for every seed of a group (its own buffers: each seed's are donated)."""
        if self.looped:  # a host copy each: no two seeds' device arrays can share memory
            return [self._replicate(jax.tree.map(np.array, tree)) for _ in self.seeds]
        if self.grouped:
            tree = jax.tree.map(lambda x: np.broadcast_to(x, (len(self.seeds), *np.shape(x))), tree)
        return self._replicate(tree)

    def zero_sums(self) -> Metrics:
        return self._per_seed(zero_metrics(training=True))

    def summarize(self, sums: Metrics) -> list[dict]:
        """Per seed: mean loss, accuracy and count of an epoch's sums."""
        return [summarize(self.member(sums, i)) for i in range(len(self.seeds))]

    @property
    def stacked(self) -> bool:
        """A group whose state carries a leading seed axis (vmap, unroll), not a list (loop)."""
        return self.grouped and not self.looped

    def _per_call(self, tree: Any) -> Any:
        """What one compiled call takes: one seed's part of a looped group, else the whole tree."""
        return self.member(tree, 0) if self.looped else tree

    def compile(self, state: TrainState) -> float:
        """Compile the steps ahead of time with the run's XLA options; return the seconds taken.

        Train calls come in up to three lengths: the run's steps per call; where the epoch does
        not divide into them, the epoch's tail (as many steps as are left over); and for a run
        resumed mid-epoch, the tail of that epoch's rest. Compiled here, the epochs' timings
        leave them out (a tail met later, an unforeseen resume, is compiled when met).
        """
        t0 = time.perf_counter()
        b, ek = self.cfg.batch_size, self.eval_steps_per_call
        options, k = self.perf.compiler_options, self.steps_per_call
        self.train_fns = {}
        if self._compile_train(k, state) != options:  # XLA rejected them: record what ran
            self.perf = dataclasses.replace(self.perf, xla_cpu="default", reasons={
                **self.perf.reasons, "xla_cpu": f"XLA rejected {options}; its default compile"})
        self.compile_tails(state)
        self.eval_fn, _ = perf.compile_lowered(self.programs.evaluate.lower(
            self._per_call(state), self._per_call(self.eval_zero()), *self.images["eval"],
            self.shard(np.zeros((ek, b), np.int32)), self.shard(np.ones((ek, b), bool))),
            self.perf.compiler_options)
        return time.perf_counter() - t0

    def compile_tails(self, state: TrainState) -> float:
        """Compile the calls an epoch and the resumed epoch's rest need that are not compiled
        yet (after `compile`, only when the resume point moved); return the seconds taken."""
        t0 = time.perf_counter()
        k, epoch = self.steps_per_call, self.steps_per_epoch
        for n in sorted(set(call_lengths(epoch, k) + call_lengths(epoch - self.resume_start, k))
                        - set(self.train_fns)):
            self._compile_train(n, state)
        return time.perf_counter() - t0

    def _compile_train(self, n: int, state: TrainState) -> dict[str, str]:
        """Compile the train call of n steps; return the XLA options it really used."""
        shape = (len(self.seeds), n, self.cfg.batch_size) if self.stacked else (
            n, self.cfg.batch_size)
        self.train_fns[n], used = perf.compile_lowered(self.programs.train.lower(
            self._per_call(state), self._per_call(self.zero_sums()), *self.images["train"],
            self.shard(np.zeros(shape, np.int32))), self.perf.compiler_options)
        return used

    def train_epoch(self, state: TrainState, epoch: int, sums: Metrics | None = None,
                    start: int = 0, progress: Callable[[int], None] = lambda n: None,
                    stop: Callable[[], bool] = lambda: False) -> tuple[TrainState, Metrics, int]:
        """Train epoch `epoch` from its step `start`; return (state, sums, steps done in it).

        Returns early, between calls, when `stop()` turns true; raises `Diverged` at the first
        non-finite loss, found at the sync after the one it happened before (and always before
        returning), and named exactly.
        """
        # Each seed's own order, as `--seed S` alone would see it: (steps, seeds, batch).
        order = np.stack([data.epoch_order(s, epoch, self.train_size, self.cfg.batch_size)
                          for s in self.seeds], axis=1)
        sums = self.zero_sums() if sums is None else sums
        k, done, pending = self.steps_per_call, start, 0
        # Sync with the device every ~32 steps only: in between, Python enqueues the next steps
        # while XLA runs the current one (async dispatch). A sync is the NaN check and the
        # progress update; `first_bad_step` names the exact step whenever it is looked at. The
        # check reads the previous sync point's flag, after this call is enqueued: reading this
        # call's own would idle the device from its end until the host has fetched it and
        # dispatched the next call (~3-4 ms per 50-step call in an H200 trace, 2026-11-28).
        sync_every, flags = max(1, 32 // k), None
        for call, (n, (idx,)) in enumerate(chunks(k, order[start:], pad=False), 1):
            if stop():
                break
            if n not in self.train_fns:  # a tail met only after a resume mid-epoch
                t0 = time.perf_counter()
                self._compile_train(n, state)
                self.compile_time_s += time.perf_counter() - t0
            step = self.train_fns[n]
            idx = idx.transpose(1, 0, 2) if self.grouped else idx[:, 0]
            if self.looped:
                state, sums = map(list, zip(*(
                    step(s, m, *self.images["train"], self.shard(i))
                    for s, m, i in zip(state, sums, idx))))
            else:
                state, sums = step(state, sums, *self.images["train"], self.shard(idx))
            done += n
            pending += n
            if call % sync_every == 0:
                if flags is not None:
                    self._check(flags, epoch)
                flags = self._flags(sums, copy=True)  # the next call donates `sums`
                progress(pending * self.cfg.batch_size)
                pending = 0
        # Also before a Ctrl-C checkpoint: never save a diverged state.
        self._check(self._flags(sums), epoch)
        progress(pending * self.cfg.batch_size)
        return state, sums, done

    def _flags(self, sums: Metrics, copy: bool = False) -> list[jax.Array]:
        """Each seed's `first_bad_step` (one array for a vmapped group, one per looped seed)."""
        flags = [m["first_bad_step"] for m in sums] if self.looped else [sums["first_bad_step"]]
        return [f.copy() for f in flags] if copy else flags

    def _check(self, flags: list[jax.Array], epoch: int) -> None:
        first_bad = np.concatenate([np.atleast_1d(fetch(f)) for f in flags])
        for seed, step in zip(self.seeds, first_bad):
            if step >= 0:  # a NaN in one seed stops the group, naming that seed
                raise Diverged(epoch, int(step), seed if self.grouped else None)

    def eval_zero(self) -> Metrics:
        return self._per_seed(zero_metrics())

    def evaluate(self, state: TrainState) -> list[dict]:
        metrics = self.eval_zero()
        for _, (idx, mask) in chunks(self.eval_steps_per_call, self.eval_idx, self.eval_mask):
            idx, mask = self.shard(idx), self.shard(mask)
            if self.looped:
                metrics = [self.eval_fn(s, m, *self.images["eval"], idx, mask)
                           for s, m in zip(state, metrics)]
            else:
                metrics = self.eval_fn(state, metrics, *self.images["eval"], idx, mask)
        return self.summarize(metrics)

    def checkpoint_tree(self, state: TrainState, sums: Metrics) -> dict:
        return {"state": state, "sums": sums}

    def global_step(self, state: TrainState) -> int:
        step = self.member(state, 0).step if self.looped else state.step
        return int(np.ravel(fetch(step))[0])  # the seeds of a group step together

    def param_leaves(self, state: TrainState, i: int = 0) -> list[np.ndarray]:
        return [fetch(x) for x in jax.tree.leaves(self.member(state, i).params)]

    def lr(self, state: TrainState) -> float:
        """The learning rate of the last step taken."""
        return float(self.schedule(max(self.global_step(state) - 1, 0)))

    def record(self) -> dict[str, Any]:
        """What summary.json says about this trainer: the speed settings it really used."""
        return {"perf": self.perf.to_dict()}
