"""Checkpoints with orbax: every epoch (asynchronously), the last 2 plus the best by eval accuracy.

A checkpoint holds everything an exact resume needs: the TrainState (params, batch_stats,
optimizer state, step), the metric sums of a partly done epoch, and a JSON record of progress
(epoch, steps done inside it, the metrics history, the config). The data order needs no state of
its own: it is a pure function of (seed, epoch), see `data.epoch_order`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class Checkpoints:
    """A thin wrapper over `ocp.CheckpointManager` with this project's policy."""

    def __init__(self, directory: Path, keep_last: int = 2):
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(keep_last),
            pp.BestN(get_metric_fn=lambda m: m["eval_acc"], reverse=False, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("train", "progress"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, train: Any, progress: dict, eval_acc: float | None) -> None:
        """Start an asynchronous save; `wait` (or the next save) makes it durable."""
        self.manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(train), progress=ocp.args.JsonSave(progress)),
            metrics=None if eval_acc is None else {"eval_acc": eval_acc}, force=True)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure (and shardings) of `like`; returns (train pytree, progress)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
        return out["train"], out["progress"]

    def progress(self, step: int) -> dict:
        """The JSON progress record of checkpoint `step`, without reading its tensors."""
        out = self.manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        return out["progress"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
