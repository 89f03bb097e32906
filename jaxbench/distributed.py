"""Multi-process runs (`--distributed`): start-up, CPU collectives, what processes agree on.

Every process runs the same program on its own devices; a jitted step over the global mesh is one
computation in which XLA inserts the cross-process all-reduces (NCCL on GPUs, gloo on CPUs). This
module holds the few things a single process never needs:

* `initialize` selects the CPU collectives (gloo) before `jax.distributed.initialize`, so
  `--distributed` works on CPU hosts with nothing to set by hand;
* `process0_first` lets process 0 do a job before the others (preparing a dataset into a shared
  folder: two processes preparing it at once would race on the same files);
* `on_process0` runs a job on process 0 alone while the others wait (removing a shared folder);
  `is_process0` and `barrier` do the same for a block of code;
* `agree` makes every process take process 0's choice of a setting each decides by itself (the
  XLA:CPU compile, by a self-check that hosts with different CPUs may answer differently):
  processes that compiled different programs would silently drift apart.

The waits go through the coordination service's key-value store (not a device computation),
with a timeout of their own.

All of them are plain calls in a single-process run, where they touch no JAX backend (a PyTorch
twin run on a GPU must not have JAX grab the GPU's memory).
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")

# The CPU collectives implementation for multi-process runs. Only JAX's CPU client reads this
# option, so selecting it is harmless on GPU hosts. jax 0.10 defaults to gloo already; older
# releases defaulted to "none", where a computation over several processes' CPUs fails.
CPU_COLLECTIVES = "gloo"
# How long a process waits for process 0's part (preparing a dataset: Tiny ImageNet's decode takes
# minutes on a slow disk). A process 0 that dies ends the wait at once: it hosts the coordinator.
WAIT_S = 6 * 3600.0


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with the CPU collectives selected; call before any JAX work.

    Without arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, TPU pods) by itself.
    JAXBENCH_HEARTBEAT_TIMEOUT_S shortens how long the coordination service waits for a silent
    process before it declares it lost (JAX's default: 100 s).
    """
    import jax

    if str(jax.config.jax_cpu_collectives_implementation or "none") == "none":
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    kwargs = {}
    if os.environ.get("JAXBENCH_HEARTBEAT_TIMEOUT_S"):
        kwargs["heartbeat_timeout_seconds"] = int(os.environ["JAXBENCH_HEARTBEAT_TIMEOUT_S"])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)
    if jax.process_count() > 1:
        # Open the collectives now, while every process is here: a gloo context is set up at the
        # first cross-process computation and gives up when a peer is 30 s late to it, which a
        # process waiting for process 0 to prepare the data would be. Once open, a collective
        # waits for late peers (until the heartbeat timeout declares one lost).
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxbench: collectives open")


def several() -> bool:
    """Is this one of several processes? (False without touching a backend when not distributed.)"""
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


_calls = 0  # every process makes the same calls in the same order: the n-th call's key is shared


def _key(kind: str) -> str:
    global _calls
    _calls += 1
    return f"jaxbench/{kind}/{_calls}"


def _client():
    # The coordination service's key-value store, as orbax uses it: a wait on it has its own
    # timeout and ends when process 0 (which hosts the service) dies.
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _publish(key: str, value: str) -> None:
    _client().key_value_set(key, value)


def _read(key: str, timeout_s: float) -> str:
    return _client().blocking_key_value_get(key, int(timeout_s * 1000))


def process0_first(job: Callable[[], T], what: str = "the job",
                   timeout_s: float = WAIT_S) -> T:
    """Run `job` on process 0, then on the others (which find its files ready).

    When it fails on process 0, the others raise ProcessZeroFailed, which points at process 0's
    error, instead of running it (or waiting forever).
    """
    import jax

    if not several():
        return job()
    key = _key("first")
    if jax.process_index() == 0:
        try:
            result = job()
        except BaseException:
            _publish(key, "failed")
            raise
        _publish(key, "ok")
        return result
    if _read(key, timeout_s) != "ok":
        raise ProcessZeroFailed(f"process 0 failed at {what}; its error says why.")
    return job()


class ProcessZeroFailed(RuntimeError):
    """Process 0 failed at a job the other processes were waiting for."""


def on_process0(job: Callable[[], object], timeout_s: float = WAIT_S) -> None:
    """Run `job` on process 0 only; every process returns once it is done."""
    import jax

    if not several():
        job()
        return
    process0_first(job if jax.process_index() == 0 else (lambda: None), "its job", timeout_s)


def agree(value: str, timeout_s: float = WAIT_S) -> str:
    """Process 0's `value` on every process; `value` itself in a single process."""
    import jax

    if not several():
        return value
    key = _key("agree")
    if jax.process_index() == 0:
        _publish(key, value)
        return value
    return _read(key, timeout_s)


def is_process0() -> bool:
    """True in a single-process run (without touching a backend) and on process 0 of several."""
    import jax

    return not several() or jax.process_index() == 0


def barrier(name: str, timeout_s: float = WAIT_S) -> None:
    """Every process waits here until all have arrived (nothing to wait for in a single one)."""
    if several():
        _client().wait_at_barrier(_key(f"barrier/{name}"), int(timeout_s * 1000))


def record(global_batch: int) -> dict:
    """What summary.json says about the processes and devices a run used."""
    import jax

    devices = jax.device_count()
    out = {"processes": jax.process_count(), "devices": devices,
           "local_devices": jax.local_device_count(), "global_batch": global_batch,
           "per_device_batch": global_batch // devices}
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        out["cpu_collectives"] = str(jax.config.jax_cpu_collectives_implementation)
    return out


def agree_perf(resolved):
    """A `perf.Resolved` whose XLA:CPU compile is process 0's: each process decides "auto" by
    its own float32 self-check, which hosts with different CPUs can answer differently; every
    process must compile the same program."""
    import dataclasses

    chosen = agree(resolved.xla_cpu)
    if chosen == resolved.xla_cpu:
        return resolved
    return dataclasses.replace(resolved, xla_cpu=chosen, reasons={
        **resolved.reasons, "xla_cpu": f"process 0's choice; this process's own check chose "
        f"{resolved.xla_cpu}"})
