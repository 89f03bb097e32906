"""Tables for README/results: per-layer parameter tables of the models, run summaries.

`python -m jaxbench.report models` prints the Markdown tables the README shows;
`python -m jaxbench.report models --full` prints flax's own `nn.tabulate` instead.
`python -m jaxbench.report runs DIR` tabulates the summary.json files under DIR.
`python -m jaxbench.report paper RUNS... --out results/` writes results/README.md (the paper's
Tables I and II beside ours, speed tables, deviations, the runs used) and one learning-curve PNG
per dataset; RUNS are run folders, folders holding them, bench JSON files, or globs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxbench import outputs, paper


def leaf_layers(model, size: int = 64) -> list[tuple[str, dict]]:
    """(path, {param name: shape-and-dtype}) for every parameterized layer, in call order.

    Shapes from `jax.eval_shape` (an eager init of DenseNet-BC takes a minute on 2 cores); the
    order from a method interceptor that sees each submodule called, since pytree utilities sort
    the names.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if path and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                                jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]

    def walk(tree: Mapping, prefix: str):
        for name, sub in tree.items():
            path = f"{prefix}/{name}" if prefix else name
            if any(isinstance(v, Mapping) for v in sub.values()):
                yield from walk(sub, path)
            else:
                yield path, dict(sub)

    return sorted(walk(params, ""), key=lambda item: order.index(item[0]))


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
    from jaxbench import models

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
            f"{paper._pick(s, 'final_eval_acc', 'final_test_acc', path):.4f} | "
            f"{paper._pick(s, 'best_eval_acc', 'best_test_acc', path):.4f} ({s['best_epoch']}) | "
            f"{s['mean_epoch_time_s']:.1f} | {s['compile_time_s']:.1f} | "
            f"{dev['platform']} {dev.get('cpu') if dev['platform'] == 'cpu' else dev['name']} |")
    return "\n".join(lines)


def _acc_cells(g: paper.Group) -> list[str]:
    params = sorted({r.summary["params"] for r in g.runs})
    epochs = sorted({len(r.curves["epoch"]) for r in g.runs})
    return [f"{len(g.runs)} ({', '.join(str(r.cfg['seed']) for r in g.runs)})",
            paper.pct(*g.stat([r.final for r in g.runs])), paper.pct(*g.stat([r.best for r in g.runs])),
            f"{statistics.fmean(r.epochs_to_99 for r in g.runs):.1f}",
            _epoch_time(g),
            " / ".join(f"{p:,}" for p in params), " / ".join(map(str, epochs))]


def _epoch_time(g: paper.Group) -> str:
    """Mean train s / epoch over the runs that had their machine to themselves."""
    timed = [r.epoch_time_s for r in g.runs if r.timed]
    if not timed:
        return "— (machine shared with other work)"
    shared = len(g.runs) - len(timed)
    return f"{statistics.fmean(timed):,.2f}" + (f" ({len(timed)} of {len(g.runs)} runs; the others shared "
                                               "the machine)" if shared else "")


def paper_table(title: str, dataset: str, exps: tuple[str, ...], groups: list[paper.Group]) -> str:
    mine = [g for g in groups if g.runs[0].cfg.get("dataset") == dataset]
    splits = sorted({f"`{r.cfg.get('eval_split')}` split, {r.summary.get('eval_examples', 0):,} images"
                     for g in mine for r in g.runs if not g.protocol})
    lines = [f"## {title}", "", f"Accuracy on the eval split ({'; '.join(splits) or 'none measured'}), mean ± "
             "sample std over seeds (n seeds). Train seconds per epoch: steady epochs (epoch 1 excluded when "
             "there are more, and an epoch resumed mid-way), training only, per seed (a seed group's epoch over its seed count). "
             "Columns marked **paper** hold the paper's numbers (one NVIDIA P100), not ours.", "",
             "| model | framework | hardware | n (seeds) | final acc | best-epoch acc | epochs to 99% of final | "
             "train s / epoch (on that hardware) | params | epochs | **paper** acc (P100) | "
             "**paper** s / epoch (P100) | ours − paper, final |", "|---|---|---|---|" + "---:|" * 9]
    for exp in list(exps) + sorted({g.exp for g in mine} - set(exps)):
        acc, secs = paper.PAPER.get(exp, (None, None))
        paper_cells = [f"{acc}%", f"~{secs} s"] if acc else ["— (not in the paper)", "—"]
        full = [g for g in mine if g.exp == exp and not g.protocol]
        for g in full:
            diff = f"{g.stat([r.final for r in g.runs])[0] - acc:+.1f} pp" if acc else "—"
            lines.append(f"| {g.model} (`{exp}`) | {g.framework} | {g.hardware} | "
                         + " | ".join(_acc_cells(g) + paper_cells + [diff]) + " |")
        if not full and acc:
            lines.append(f"| `{exp}` | — | — | **not measured**: no full-protocol run among the inputs; "
                         f"make one per seed S = 0, 1, 2 with {paper.command_for(exp, dataset)} | "
                         + " | ".join(["—"] * 6 + paper_cells + ["—"]) + " |")
    short = [g for g in mine if g.protocol]
    if short:
        lines += ["", "Shorter or changed protocols (**not** the 25-epoch protocol; not comparable with the "
                  "rows above or with the paper):", "",
                  "| model | framework | hardware | **protocol** | n (seeds) | final acc | best-epoch acc | "
                  "epochs to 99% of final | train s / epoch | params | epochs |", "|---|---|---|---|---|" + "---:|" * 6]
        lines += [f"| {g.model} (`{g.exp}`) | {g.framework} | {g.hardware} | {g.protocol} | "
                  + " | ".join(_acc_cells(g)) + " |" for g in short]
    return "\n".join(lines)


def curves_png(title: str, dataset: str, groups: list[paper.Group], path: Path) -> bool:
    """2x2 learning curves, one line per group (mean over seeds, min–max band); False if nothing to plot."""
    mine = [g for g in groups if g.runs[0].cfg.get("dataset") == dataset
            and max(len(r.curves["epoch"]) for r in g.runs) >= 2]
    if not mine:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    for i, g in enumerate(mine):
        epochs = sorted({e for r in g.runs for e in r.curves["epoch"]})
        for ax, key in zip(axes.flat, paper.CURVES):
            scale = 100 if key.endswith("acc") else 1
            per = [[scale * r.curves[key][r.curves["epoch"].index(e)] for r in g.runs if e in r.curves["epoch"]]
                   for e in epochs]
            ax.plot(epochs, [statistics.fmean(v) for v in per], color=f"C{i}", label=f"{g.label}, n={len(g.runs)}")
            ax.fill_between(epochs, [min(v) for v in per], [max(v) for v in per], color=f"C{i}", alpha=0.2, lw=0)
    splits = "/".join(sorted({r.cfg.get("eval_split", "?") for g in mine for r in g.runs}))
    for ax, key in zip(axes.flat, paper.CURVES):
        split, kind = key.split("_")
        where = f"eval ({splits} split)" if split == "eval" else "train"
        ax.set_title(f"{where} {'loss (log scale)' if kind == 'loss' else 'accuracy (%)'}")
        ax.set_yscale("log" if kind == "loss" else "linear")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds, band = min–max over seeds")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as err:
        raise outputs.OutputError(path, err) from None
    finally:
        plt.close(fig)
    return True


def speed_section(benches: list, out: Path) -> str:
    lines = ["## Speed: JAX vs PyTorch", "", "Seconds per training epoch (60,000 Fashion-MNIST or 100,000 Tiny "
             "ImageNet images), from each variant's steady-state time per 1,000 images in a `jaxbench.bench` run "
             "(median of its repeats; no evaluation, no compilation). One table per machine; each row comes "
             "from one bench run (its source below the table), and ratios are taken only within that run."]
    machines: dict[str, list] = {}
    for bench in sorted(benches, key=lambda b: str(b[0])):
        machines.setdefault(bench[2].get("hardware") or paper.bench_machine(bench[1]), []).append(bench)
    for machine, files in machines.items():
        rows = sorted(((i, row) for i, (_, data, _) in enumerate(files, 1) for row in paper.speed_rows(data)),
                      key=lambda x: (x[1][1] != "float32", x[1][0], x[0]))
        variants = sorted(dict.fromkeys(v for _, row in rows for v in row[2]), key=lambda v: not v.startswith("jax"))
        lines += ["", f"### {machine}", "", "| experiment | dtype | " + " | ".join(variants)
                  + " | JAX / fastest PyTorch | source |", "|---|---|" + "---:|" * (len(variants) + 1) + "---|"]
        lines += [f"| {exp} | {dtype} | " + " | ".join(_secs(t[v]) if v in t else "—" for v in variants)
                  + f" | {ratio} | [{i}] |" for i, (exp, dtype, t, ratio) in rows]
        lines.append("")
        for i, (path, data, prov) in enumerate(files, 1):
            versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
            note = f" {prov['speed_note']}" if prov.get("speed_note") else ""  # e.g. a known flaw
            lines.append(f"[{i}] [{_shown(path)}]({_link(path, out)}): `{paper.scrub(data['command'])}`; "
                         f"{_when(prov, out)}; {versions}.{note}  ")
    return "\n".join(lines)


def _secs(s: float) -> str:
    return f"{s:,.0f} s" if s >= 100 else f"{s:.1f} s" if s >= 10 else f"{s:.2f} s"


def _shown(p: Path) -> str:
    """A path as the reader of the repository sees it (relative to where the report ran)."""
    rel = os.path.relpath(p)
    return rel if not rel.startswith("..") else str(p)


def _link(p: Path, out: Path) -> str:
    return os.path.relpath(p, out).replace(os.sep, "/")


def _when(prov: dict, out: Path) -> str:
    readme = f", [README]({_link(prov['readme'], out)})" if prov.get("readme") else ""
    return f"date {prov.get('date') or 'not recorded'}, commit {prov.get('commit') or 'not recorded'}{readme}"


def write_paper_report(inputs: list[str], out: Path, command: str) -> list[Path]:
    runs, benches = paper.collect(inputs)
    groups = paper.group_runs(runs)
    swings = paper.late_swings(groups)
    swings = (f" (the largest change between consecutive epochs among the last {paper.LATE_EPOCHS} of "
              "these full-protocol runs: " + ", ".join(f"{k} {v:.1f} pp" for k, v in sorted(swings.items()))
              + ")") if swings else ""
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Results: the paper's Tables I and II beside ours\n\nGenerated by `{command}` from the files "
             "listed under [Runs used](#runs-used) and under each speed table; do not edit by hand. Numbers "
             "marked **paper** are the paper's (one NVIDIA P100); every other number is ours, measured by this "
             "repository's code.",
             "## Findings\n\nComparisons give the final epoch's accuracy, as the paper does, and the "
             f"mean of the last {paper.LATE_EPOCHS} epochs: once the models overfit, eval accuracy "
             f"moves from one epoch to the next{swings}, so one final epoch is a noisy sample.\n\n"
             + "\n".join(f"- {f}" for f in paper.findings(groups) or ["no full-protocol runs yet."])]
    parts += [paper_table(title, dataset, exps, groups) for title, dataset, exps in paper.TABLES]
    written, curves = [], ["## Learning curves", "", "One line per model and hardware (and protocol, if not the "
                           "experiment's own), mean over seeds, band = min–max over seeds; losses on a log scale. "
                           "Runs with a single epoch are not drawn."]
    for title, dataset, _ in paper.TABLES:
        png = out / f"curves_{dataset}.png"
        if curves_png(title.split(": ")[1], dataset, groups, png):
            written.append(png)
            curves += ["", f"![{title}: learning curves]({png.name})"]
        else:
            curves += ["", f"{title}: no run with 2 or more epochs, no curves."]
    parts.append("\n".join(curves))
    parts.append(speed_section(benches, out) if benches else "## Speed\n\nNo bench JSON among the inputs.")
    parts.append("## Deviations from the paper's protocol\n\n" + "\n".join(f"- {d}" for d in paper.deviations(runs)))
    rows = ["## Runs used", "", "| run folder | experiment | framework | seed | epochs | hardware | protocol | "
            "date, commit, provenance |", "|---|---|---|---:|---:|---|---|---|"]
    rows += [f"| [{_shown(r.path)}]({_link(r.path, out)}) | {r.exp} | {r.framework} | {r.cfg['seed']} | "
             f"{len(r.curves['epoch'])} | {r.hardware} | {r.protocol or 'the experiment’s own'} | "
             f"{_when(r.provenance, out)} |" for r in sorted(runs, key=lambda r: str(r.path))]
    parts.append("\n".join(rows))
    outputs.write_atomic(out / "README.md", "\n\n".join(parts) + "\n")
    return [out / "README.md", *written]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("models", help="per-layer parameter tables")
    m.add_argument("--full", action="store_true", help="flax's nn.tabulate instead of Markdown")
    r = sub.add_parser("runs", help="table of the summary.json files under a folder")
    r.add_argument("folder", type=Path)
    pp = sub.add_parser("paper", help="results/README.md and learning-curve PNGs from run folders")
    pp.add_argument("inputs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                    help="run folders (summary.json + metrics.jsonl), folders holding them, bench JSON files")
    pp.add_argument("--out", type=Path, default=Path("results"), help="where README.md and the PNGs go")
    args = p.parse_args(argv)
    if args.what == "paper":
        shown = [os.path.relpath(a) if os.path.isabs(a) and not os.path.relpath(a).startswith("..") else a
                 for a in args.inputs + [str(args.out)]]
        command = "python -m jaxbench.report paper " + shlex.join(shown[:-1]) + " --out " + shlex.quote(shown[-1])
        try:
            outputs.ensure_dir(args.out, "--out")
            written = write_paper_report(args.inputs, args.out, command)
        except (paper.ReportError, outputs.OutputPathError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except outputs.OutputError as err:  # a full disk, a permission taken away
            print(f"error: {err}", file=sys.stderr)
            return outputs.EXIT_OUTPUT_FAILED
        print("wrote " + ", ".join(map(str, written)))
        return 0
    if args.what == "models":
        for name in ("baseline", "target", "densenet"):
            for classes in (10, 200):
                if args.full:
                    import flax.linen as nn
                    import jax
                    import jax.numpy as jnp

                    from jaxbench import models

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
