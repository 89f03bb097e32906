"""Tables for README/results: per-layer parameter tables of the models, run summaries.

`python -m jaxbench.report models` prints the Markdown tables the README shows;
`python -m jaxbench.report models --full` prints flax's own `nn.tabulate` instead.
`python -m jaxbench.report runs DIR` tabulates the summary.json files under DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import models


def leaf_layers(model, size: int = 64) -> list[tuple[str, dict]]:
    """(path, {param name: array}) for every parameterized layer, in call order.

    `init` (not `eval_shape`) keeps the order in which flax created the layers; pytree
    utilities would sort the names.
    """
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)["params"]

    def walk(tree: Mapping, prefix: str):
        for name, sub in tree.items():
            path = f"{prefix}/{name}" if prefix else name
            if any(isinstance(v, Mapping) for v in sub.values()):
                yield from walk(sub, path)
            else:
                yield path, dict(sub)

    return list(walk(params, ""))


def layer_rows(model, size: int = 64) -> list[tuple[str, str, int]]:
    """(top-level layer, what it holds, parameter count), in call order; blocks are summed."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for path, params in leaf_layers(model, size):
        groups.setdefault(path.split("/")[0], []).append((path, params))
    rows = []
    for top, leaves in groups.items():
        count = int(sum(np.prod(v.shape) for _, p in leaves for v in p.values()))
        if len(leaves) == 1:
            what = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(leaves[0][1].items()))
        else:
            kinds = Counter(path.rsplit("/", 1)[1].rpartition("_")[0] for path, _ in leaves)
            what = ", ".join(f"{n}x {kind}" for kind, n in kinds.items())
        rows.append((top, what, count))
    return rows


def model_table(name: str, classes: int) -> str:
    model = models.build(name, classes)
    rows = layer_rows(model)
    lines = [f"**{type(model).__name__}**, {classes} classes: {sum(r[2] for r in rows):,} parameters",
             "", "| layer | parameters | count |", "|---|---|---:|"]
    lines += [f"| {layer} | {shapes} | {count:,} |" for layer, shapes, count in rows]
    return "\n".join(lines)


def runs_table(folder: Path) -> str:
    """One row per summary.json below `folder`."""
    lines = ["| experiment | framework | epochs | params | final acc | best acc (epoch) | "
             "s/epoch (steady) | compile s | device |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for path in sorted(folder.rglob("summary.json")):
        s = json.loads(path.read_text())
        dev = s["device"]
        lines.append(
            f"| {s['experiment']} | {s['framework']} | {s['epochs_completed']} | {s['params']:,} | "
            f"{s['final_test_acc']:.4f} | {s['best_test_acc']:.4f} ({s['best_epoch']}) | "
            f"{s['mean_epoch_time_s']:.1f} | {s['compile_time_s']:.1f} | "
            f"{dev['platform']} {dev.get('cpu') if dev['platform'] == 'cpu' else dev['name']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("models", help="per-layer parameter tables")
    m.add_argument("--full", action="store_true", help="flax's nn.tabulate instead of Markdown")
    r = sub.add_parser("runs", help="table of the summary.json files under a folder")
    r.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.what == "models":
        for name in ("baseline", "target", "densenet"):
            for classes in (10, 200):
                if args.full:
                    import flax.linen as nn

                    print(nn.tabulate(models.build(name, classes), jax.random.key(0))(
                        jnp.zeros((1, 64, 64, 3)), train=False))
                else:
                    print(model_table(name, classes) + "\n")
    else:
        if not args.folder.is_dir():
            print(f"error: {args.folder}: no such folder", file=sys.stderr)
            return 2
        print(runs_table(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
