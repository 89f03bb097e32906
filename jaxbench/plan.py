"""The plan of a suite: which subprocess runs which seeds (`Job`), whether never-started seeds
run as one seed group or one after another, and each run's estimated time.

Decided from the suite folder alone and the warm-up's timings, so a dry run prints the plan that
a real run then follows.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from jaxbench.config import Config
from jaxbench.suite import (SeedState, checkpoint_dir, checkpointed_groups, has_checkpoint,
                            seed_state)

# Per dataset: (train, eval) examples, for estimates when the data are not checked; image shape.
SIZES = {"fashion_mnist": (60_000, 10_000), "tiny_imagenet": (100_000, 10_000)}
SHAPES = {"fashion_mnist": (28, 28, 1), "tiny_imagenet": (64, 64, 3)}


@dataclasses.dataclass
class Job:
    """One subprocess: `python -m jaxbench.run` for a seed group, or for one seed."""

    exp: str  # what --exp gets: a name or a .toml path
    cfg: Config
    seeds: tuple[int, ...]
    mode: str  # "group" (--seeds) or "single" (--seed)
    resume: bool
    epochs_done: int
    estimate: dict | None = None  # setup_s, epoch_s, total_s

    @property
    def name(self) -> str:
        return self.cfg.name


def plan_experiment(out: Path, exp: str, cfg: Config, seeds: Sequence[int]
                    ) -> tuple[list[Job], list[int], list[SeedState]]:
    """(runs to resume, seeds to start, every planned seed's state) for one experiment.

    An unfinished run resumes as it started: the group (or the one seed) whose checkpoint folder
    holds it, even if some of its seeds are finished (their files are rewritten, the same).
    """
    states = [seed_state(out, cfg, s) for s in seeds]
    todo = [s.seed for s in states if not s.finished]
    jobs, covered = [], set()
    for mode, group in checkpointed_groups(out, cfg.name):
        if set(group) & set(todo) and not set(group) & covered:
            done = [seed_state(out, cfg, s) for s in group]
            jobs.append(Job(exp, cfg, group, mode, True, min(s.epochs_done for s in done)))
            covered |= set(group)
    return jobs, [s for s in todo if s not in covered], states


def new_jobs(exp: str, cfg: Config, seeds: list[int], grouping: str, out: Path,
             states: dict[int, SeedState]) -> list[Job]:
    """Seeds that never ran: one seed group, or one run per seed."""
    if not seeds:
        return []
    def resume(group, mode):  # a checkpoint can exist without a step: never --resume then
        return has_checkpoint(checkpoint_dir(out, cfg.name, group, mode))
    if grouping == "group" and len(seeds) > 1:
        group = tuple(seeds)
        return [Job(exp, cfg, group, "group", resume(group, "group"), 0)]
    return [Job(exp, cfg, (s,), "single", resume((s,), "single"), states[s].epochs_done)
            for s in seeds]


def warmup_item(exp: str, cfg: Config, resumed: list[Job], pending: list[int], overrides: dict,
                decided: str | None) -> dict:
    """What the warm-up times for one experiment: each way its runs may go (one seed, a group)."""
    modes = {j.mode for j in resumed}
    if len(pending) == 1 or (pending and decided == "sequential"):
        modes.add("single")
    elif pending and decided == "group":
        modes.add("group")
    elif pending:  # the probe knows the device: auto_grouping's choice
        modes.add("auto")
    group = max([j.seeds for j in resumed if j.mode == "group"]
                + ([tuple(pending)] if len(pending) > 1 else []), key=len, default=())
    return {"exp": exp, "name": cfg.name, "overrides": overrides, "seeds": list(group),
            "modes": sorted(modes), "shape": SHAPES[cfg.dataset]}


def steps_and_batches(cfg: Config, sizes: tuple[int, int]) -> tuple[int, int]:
    """Train steps and eval batches per epoch of the splits' `sizes`, after the experiment's
    train/eval limits (its first N examples)."""
    train, evaluate = sizes
    train, evaluate = min(train, cfg.train_limit or train), min(evaluate, cfg.eval_limit or evaluate)
    return train // cfg.batch_size, math.ceil(evaluate / cfg.batch_size)


def estimate(job: Job, timing: dict | None, sizes: tuple[int, int]) -> dict | None:
    """Setup + remaining epochs x (train steps + eval batches), from the warm-up's timings."""
    measured = (timing or {}).get(job.mode)
    if not measured:
        return None
    scale = len(job.seeds) / measured["seeds"] if job.mode == "group" else 1.0
    steps, batches = steps_and_batches(job.cfg, sizes)
    epoch_s = scale * (steps * measured["step_s"] + batches * measured["eval_batch_s"])
    setup_s = measured["setup_s"]
    left = max(job.cfg.epochs - job.epochs_done, 0)
    return {"setup_s": setup_s, "epoch_s": epoch_s, "epochs": left,
            "total_s": setup_s + left * epoch_s}


def auto_grouping(backend: str | None) -> dict:
    """`--grouping auto`: the seeds of an experiment as one seed group (`--seeds`): vmapped on an
    accelerator; looped on XLA:CPU (`perf.seed_group`), where a group of 3 BaselineCNN seeds took
    2.70x one seed's epoch against 3x for the seeds one after another (2-core AMD EPYC,
    `python -m jaxbench.bench --variants jax,jax-seeds3`, 2026-11-27)."""
    if backend == "cpu":
        return {"mode": "group", "reason": "auto on CPU: a looped seed group (each seed's own "
                "compiled step in turn) ran 3 seeds in 2.70x one seed's time, one after another "
                "takes 3x; --grouping sequential runs them as separate runs"}
    if backend is None:
        return {"mode": "group", "reason": "auto, device unknown here (a dry run without the "
                "warm-up): the seeds as one seed group"}
    return {"mode": "group", "reason": f"auto on {backend}: the seeds vmapped as one program "
            "(--seeds), every kernel doing all seeds' work"}


def decide_grouping(seeds: list[int], flag: str, recorded: dict | None,
                    backend: str | None) -> dict:
    """How this experiment's never-started seeds run: {"mode": "group"|"sequential", "reason"}.
    Decided once per suite folder (recorded in provenance.json) and kept when it resumes."""
    if flag != "auto":
        return {"mode": flag, "reason": f"set by --grouping {flag}"}
    if recorded:
        return recorded
    if len(seeds) <= 1:
        return {"mode": "sequential", "reason": "one seed"}
    return auto_grouping(backend)


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
