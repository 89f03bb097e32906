"""The paper's Tables I and II, speed tables and learning curves, from run folders and bench files.

`python -m jaxbench.report paper RUNS... --out results/` (see `report.py`) calls `write_report`.
A run folder holds `summary.json` + `metrics.jsonl` (as `python -m jaxbench.run` writes them); a
bench file is the JSON of `python -m jaxbench.bench`. Both are found recursively under each input.
Eval metrics are read as `eval_*` and, for runs written before that name, as `test_*`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import statistics
import sys
import tomllib
from pathlib import Path

from jaxbench import config as configs
from jaxbench.outputs import hardware_of, seed_epoch_time

# The paper's numbers (its Tables I and II, one NVIDIA P100): final accuracy %, seconds per epoch.
PAPER = {"fmnist_baseline": (92.3, 10), "fmnist_target": (89.5, 13),
         "tiny_baseline": (53.4, 65), "tiny_target": (58.1, 88)}
TABLES = (("Table I: Fashion-MNIST", "fashion_mnist", ("fmnist_baseline", "fmnist_target")),
          ("Table II: Tiny ImageNet", "tiny_imagenet", ("tiny_baseline", "tiny_target")))
MODEL_NAMES = {"baseline": "BaselineCNN", "target": "TargetCNN", "densenet": "DenseNet-BC"}
TRAIN_IMAGES = {"fashion_mnist": 60_000, "tiny_imagenet": 100_000}
DATA_DIRS = {"fashion_mnist": "../shared/data/fashion-mnist", "tiny_imagenet": "../shared/data/tiny-imagenet-200"}
PROTOCOL_KEYS = ("epochs", "batch_size", "optimizer", "learning_rate", "momentum", "schedule",
                 "image_size", "model", "train_split", "eval_split", "train_limit", "eval_limit",
                 "dtype")
CURVES = ("train_loss", "eval_loss", "train_acc", "eval_acc")
# Epochs averaged for `Run.late_mean`: late in the 25-epoch protocol the models overfit and eval
# accuracy moves from one epoch to the next (`late_swings`: up to 1.5 pp in results/measured/), so
# the final epoch alone is a noisy sample.
LATE_EPOCHS = 5
REQUIRED = ("experiment", "config", "device", "params", "mean_epoch_time_s")


class ReportError(ValueError):
    """A bad input file: the CLI prints the message (it names the file) and exits 2."""


@dataclasses.dataclass
class Run:
    path: Path
    summary: dict
    curves: dict[str, list[float]]  # epoch -> value lists, keyed by CURVES and "epoch"
    hardware: str
    protocol: str  # "" for the experiment's own protocol, else what differs
    provenance: dict

    @property
    def exp(self) -> str:
        return self.summary["experiment"]

    @property
    def cfg(self) -> dict:
        return self.summary["config"]

    @property
    def final(self) -> float:
        return 100 * _pick(self.summary, "final_eval_acc", "final_test_acc", self.path / "summary.json")

    @property
    def best(self) -> float:
        return 100 * _pick(self.summary, "best_eval_acc", "best_test_acc", self.path / "summary.json")

    @property
    def late_mean(self) -> float:
        """Mean eval accuracy (%) over the last `LATE_EPOCHS` epochs."""
        return 100 * statistics.fmean(self.curves["eval_acc"][-LATE_EPOCHS:])

    @property
    def epochs_to_99(self) -> int:
        accs = self.curves["eval_acc"]
        return next(e for e, a in zip(self.curves["epoch"], accs) if a >= 0.99 * accs[-1])

    @property
    def epoch_time_s(self) -> float:
        """One seed's train seconds per epoch (a seed group's epoch over its size)."""
        return seed_epoch_time(self.summary)

    @property
    def timed(self) -> bool:
        """Whether its epoch times measure the hardware: a measurement folder lists in its
        provenance.json `shared_machine` the run folders that shared the machine with other work."""
        return self.path.name not in self.provenance.get("shared_machine", [])

    @property
    def framework(self) -> str:
        fw = self.summary.get("framework", "jax")
        if fw == "torch":
            mode = self.summary.get("torch_compile")  # absent in runs before it was recorded
            return ("PyTorch eager" if mode in (None, "none") else "PyTorch torch-best"
                    if mode == "best" else f"PyTorch compile ({mode})")
        return "JAX" if fw == "jax" else fw


def _pick(record: dict, new: str, old: str, where) -> float:
    for key in (new, old):
        if record.get(key) is not None:
            return float(record[key])
    raise ReportError(f"{where}: neither {new!r} nor {old!r} is present")


def protocol_of(summary: dict) -> str:
    """What this run did differently from its experiment's TOML ('' if nothing)."""
    cfg, exp = summary["config"], summary["experiment"]
    toml = configs.available().get(exp)
    defaults = {"train_limit": None, "eval_limit": None, "dtype": "float32"}
    ref = defaults | (tomllib.loads(toml.read_text()) if toml else {})
    diffs = []
    if summary.get("epochs_completed", cfg["epochs"]) < cfg["epochs"]:
        diffs.append(f"stopped after {summary['epochs_completed']} of {cfg['epochs']} epochs")
    for key in PROTOCOL_KEYS:
        # dtype lives in the [perf] table of newer summaries, at the top level of older ones
        value = cfg.get(key, cfg.get("perf", {}).get(key, defaults.get(key)))
        recorded = key in cfg or key in cfg.get("perf", {}) or key in defaults
        if key not in ref or value == ref[key] or not recorded:  # older summaries lack some keys
            continue
        if key == "epochs":
            cosine = f" (cosine over {value})" if cfg.get("schedule") == "cosine" else ""
            diffs.append(f"{value} epoch{'s' * (value != 1)}{cosine} instead of {ref[key]}")
        elif key.endswith("_limit"):
            diffs.append(f"first {value:,} {key.split('_')[0]} images" if value else f"no {key}")
        else:
            diffs.append(f"{key} {value}")
    seen, full = summary.get("train_examples"), TRAIN_IMAGES.get(cfg.get("dataset"))
    if seen and full and seen < full and not cfg.get("train_limit"):  # a subset, e.g. an .npz
        diffs.append(f"{seen:,} train images instead of {full:,}")
    return ", ".join(diffs)


def provenance_of(folder: Path) -> dict:
    """Date, commit, notes and README of the measurement folder a run or bench file sits in: the
    nearest `provenance.json` and `README.md` above it (up to the repository root), and a date
    from the nearest folder name starting with YYYY-MM-DD."""
    found: dict = {}
    for up in [folder, *folder.parents]:
        if (up / "provenance.json").is_file() and "commit" not in found:
            try:
                found = json.loads((up / "provenance.json").read_text()) | found
            except ValueError as err:
                raise ReportError(f"{up / 'provenance.json'}: not valid JSON ({err})") from None
        if (up / "README.md").is_file() and not (up / ".git").exists():
            found.setdefault("readme", up / "README.md")
        if match := re.match(r"(\d{4}-\d{2}-\d{2})", up.name):
            found.setdefault("date", match.group(1))
        if (up / ".git").exists():
            break
    return found


def load_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`; None for one that never finished an epoch (it diverged or was
    stopped in epoch 1), which has nothing to report."""
    spath, mpath = run_dir / "summary.json", run_dir / "metrics.jsonl"
    try:
        summary = json.loads(spath.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{spath}: not a readable summary.json ({err}); rerun or remove the run folder") from None
    if isinstance(summary, dict) and summary.get("epochs_completed") == 0:
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise ReportError(f"{spath}: not a jaxbench.run summary (no config object)")
    missing = [k for k in REQUIRED if k not in summary]
    missing += [f"config.{k}" for k in ("seed", "epochs", "dataset") if k not in summary["config"]]
    if missing:
        raise ReportError(f"{spath}: summary.json lacks {', '.join(missing)}; not written by jaxbench.run")
    if not mpath.is_file():
        raise ReportError(f"{mpath}: missing; a run folder needs summary.json and metrics.jsonl")
    curves: dict[str, list[float]] = {k: [] for k in ("epoch", *CURVES)}
    for i, line in enumerate(mpath.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            values = {"epoch": rec["epoch"], "train_loss": rec["train_loss"], "train_acc": rec["train_acc"],
                      "eval_loss": _pick(rec, "eval_loss", "test_loss", f"{mpath}:{i}"),
                      "eval_acc": _pick(rec, "eval_acc", "test_acc", f"{mpath}:{i}")}
        except (ValueError, KeyError, TypeError) as err:
            raise ReportError(f"{mpath}:{i}: not a metrics record ({err})") from None
        for key, value in values.items():
            curves[key].append(value)
    if not curves["epoch"]:
        raise ReportError(f"{mpath}: no epochs recorded")
    prov = provenance_of(run_dir)
    # A folder of runs made at several commits names each run's own in `commits` (folder -> commit).
    own = prov.get("commits", {}).get(run_dir.name) if isinstance(prov.get("commits"), dict) else None
    prov["commit"] = own or prov.get("commit") or summary.get("commit") or summary.get("git_commit")
    # A folder whose CPU differs from others of the same name says so (`hardware`): seconds per
    # epoch of two machines must not share one row.
    hardware = prov.get("hardware") or hardware_of(summary["device"])
    return Run(run_dir, summary, curves, hardware, protocol_of(summary), prov)


def is_bench(data) -> bool:
    return isinstance(data, dict) and {"command", "machine", "experiments"} <= set(data)


def is_group_summary(path: Path) -> bool:
    """A `--seeds` group's own summary.json (no metrics.jsonl beside it; one folder per seed)."""
    if (path.parent / "metrics.jsonl").exists():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == "seed_group"
    except ValueError:
        return False


def collect(inputs: list[str]) -> tuple[list[Run], list[tuple[Path, dict, dict]]]:
    """Runs and bench files under the inputs (folders, files or globs)."""
    runs, benches, seen = [], [], set()
    for arg in inputs:
        paths = [Path(p) for p in sorted(glob.glob(arg))] if glob.has_magic(arg) else [Path(arg)]
        if not paths or not all(p.exists() for p in paths):
            raise ReportError(f"{arg}: no such file or folder")
        for root in paths:
            summaries = sorted(root.rglob("summary.json")) if root.is_dir() else [root] * (root.name == "summary.json")
            for spath in summaries:
                if is_group_summary(spath):  # a --seeds group's summary: its seeds are runs
                    continue
                if spath.parent.resolve() not in seen:
                    seen.add(spath.parent.resolve())
                    run = load_run(spath.parent)
                    if run is None:
                        print(f"note: {spath.parent} finished no epoch; left out of the report",
                              file=sys.stderr)
                    else:
                        runs.append(run)
            for jpath in sorted(root.rglob("*.json")) if root.is_dir() else [root]:
                if jpath.name == "summary.json" or jpath.resolve() in seen:
                    continue
                try:
                    data = json.loads(jpath.read_text())
                except ValueError as err:
                    if jpath == root:
                        raise ReportError(f"{jpath}: not valid JSON ({err})") from None
                    continue
                if is_bench(data):
                    if not all("per_1000_images_s" in v for e in data["experiments"].values()
                               for v in e.get("variants", {}).values()):
                        raise ReportError(f"{jpath}: a bench JSON without per_1000_images_s for every variant")
                    seen.add(jpath.resolve())
                    benches.append((jpath, data, provenance_of(jpath.parent)))
                elif jpath == root:
                    raise ReportError(f"{jpath}: neither a run's summary.json nor a jaxbench.bench JSON")
    if not runs and not benches:
        raise ReportError(f"no summary.json or bench JSON under {' '.join(inputs)}")
    return runs, benches


@dataclasses.dataclass
class Group:
    exp: str
    framework: str
    hardware: str
    protocol: str
    runs: list[Run]

    @property
    def model(self) -> str:
        return MODEL_NAMES.get(self.runs[0].cfg.get("model"), self.runs[0].cfg.get("model", "?"))

    @property
    def label(self) -> str:
        fw = "" if self.framework == "JAX" else f"{self.framework}, "
        return f"{self.model} ({fw}{self.hardware}{', ' + self.protocol if self.protocol else ''})"

    def stat(self, values: list[float]) -> tuple[float, float | None]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in sorted(runs, key=lambda r: (r.exp, r.framework != "JAX", r.hardware, r.protocol, r.cfg["seed"])):
        key = (run.exp, run.framework, run.hardware, run.protocol)
        group = groups.setdefault(key, Group(*key, runs=[]))
        twin = next((r for r in group.runs if r.cfg["seed"] == run.cfg["seed"]), None)
        if twin is not None:  # it would count twice in n and shrink the std
            raise ReportError(f"seed {run.cfg['seed']} of {run.exp} on {run.hardware} is in two run "
                              f"folders among the inputs: {twin.path} and {run.path}; pass one of them.")
        group.runs.append(run)
    return list(groups.values())


def pct(mean: float, std: float | None) -> str:
    return f"{mean:.2f}%" if std is None else f"{mean:.2f} ± {std:.2f}%"


def command_for(exp: str, dataset: str) -> str:
    return f"`python -m jaxbench.run --exp {exp} --seed S --manual-dir {DATA_DIRS.get(dataset, 'DIR')}`"


def findings(groups: list[Group]) -> list[str]:
    """Plain statements the tables support: model order vs the paper's, ours vs the paper's,
    and whether the same experiment agrees across hardware, and JAX with the PyTorch twin,
    within the seed spread. A PyTorch run is compared with JAX on its own hardware when JAX ran
    there (only then do the two differ by framework alone), else with every JAX run."""
    full = [g for g in groups if not g.protocol]
    out = []
    for title, dataset, (base, target) in TABLES:
        for hw in sorted({g.hardware for g in full}):
            pair = {g.exp: g for g in full if g.hardware == hw and g.framework == "JAX" and g.exp in (base, target)}
            if len(pair) < 2:
                continue
            b, t = (pair[e].stat([r.final for r in pair[e].runs])[0] for e in (base, target))
            ours = "TargetCNN beats our BaselineCNN" if t > b else "BaselineCNN beats our TargetCNN"
            paper_t_wins = PAPER[target][0] > PAPER[base][0]
            same = (t > b) == paper_t_wins
            out.append(f"{title.split(': ')[1]} on {hw}: our {ours}, {t:.2f}% vs {b:.2f}% final accuracy "
                       f"(TargetCNN n={len(pair[target].runs)}, BaselineCNN n={len(pair[base].runs)}). The paper "
                       f"reports TargetCNN {PAPER[target][0]}% and BaselineCNN {PAPER[base][0]}%: "
                       + ("the same order." if same else "the reverse order."))
    for g in full:
        if g.exp in PAPER:
            mean = g.stat([r.final for r in g.runs])[0]
            out.append(f"{g.exp}, {g.label}: {mean:.2f}% final vs the paper's {PAPER[g.exp][0]}% "
                       f"({mean - PAPER[g.exp][0]:+.1f} pp).")
    for i, a in enumerate(full):
        for b in full[i + 1:]:
            if (a.exp, a.framework) == (b.exp, b.framework) and a.hardware != b.hardware:
                out.append(f"{a.exp} on {a.hardware} vs {b.hardware} (same code path, other "
                           f"hardware): " + _agreement(a, b))
    for b in full:  # each PyTorch variant against JAX: on its own hardware where JAX ran there
        if not b.framework.startswith("PyTorch"):
            continue
        jax = [a for a in full if a.exp == b.exp and a.framework == "JAX"]
        for a in [a for a in jax if a.hardware == b.hardware] or jax:
            where = a.hardware if a.hardware == b.hardware else f"{a.hardware} vs {b.hardware}"
            out.append(f"{a.exp}, JAX vs {b.framework} (the twin: same model, start, data "
                       f"and schedule), on {where}: " + _agreement(a, b))
    return out


def late_swings(groups: list[Group]) -> dict[str, float]:
    """"Dataset ModelName" -> the largest change of eval accuracy (pp) between consecutive epochs
    among the last `LATE_EPOCHS` of any full-protocol run: how noisy one final epoch is."""
    names = {dataset: title.split(": ")[1] for title, dataset, _ in TABLES}
    out: dict[str, float] = {}
    for g in groups:
        dataset = names.get(g.runs[0].cfg.get("dataset"))
        if g.protocol or dataset is None:
            continue
        key = f"{dataset} {g.model}"
        for r in g.runs:
            acc = r.curves["eval_acc"][-LATE_EPOCHS:]
            out[key] = max([out.get(key, 0.0)] + [100 * abs(x - y) for x, y in zip(acc, acc[1:])])
    return out


def _agreement(a: Group, b: Group) -> str:
    """Two groups' final accuracies, and whether they agree within the seed spread; then the same
    for their late-epoch means, which the final epoch's swings do not decide."""
    fa, fb = [r.final for r in a.runs], [r.final for r in b.runs]
    (ma, sa), (mb, sb) = a.stat(fa), b.stat(fb)
    std = lambda s: "n/a" if s is None else f"{s:.2f}"
    la, lb = [r.late_mean for r in a.runs], [r.late_mean for r in b.runs]
    return (f"{ma:.2f}% vs {mb:.2f}% final, difference {ma - mb:+.2f} pp, seed std {std(sa)} / "
            f"{std(sb)} pp (n={len(fa)} / {len(fb)}); " + _verdict(fa, fb) + " Mean of the last "
            f"{LATE_EPOCHS} epochs: {a.stat(la)[0]:.2f}% vs {b.stat(lb)[0]:.2f}%; "
            + _verdict(la, lb))


def _verdict(xa: list[float], xb: list[float]) -> str:
    if min(len(xa), len(xb)) < 2:
        return "with one seed on a side there is no seed spread to compare against."
    if max(min(xa), min(xb)) <= min(max(xa), max(xb)):
        return "the seeds' min–max ranges overlap: they agree within the seed spread."
    return "the seeds' min–max ranges do not overlap: they do not agree within the seed spread."


def bench_machine(data: dict) -> str:
    m = data["machine"]
    return m["gpu"] if m.get("gpu") else hardware_of({"platform": "cpu", **m})


def scrub(command: str) -> str:
    """Absolute paths in a recorded command become DIR."""
    return re.sub(r"(?<![\w.~])/[^\s`'\"]+", "DIR", command)


def speed_rows(data: dict) -> list[tuple[str, str, dict[str, float], str]]:
    """(experiment, dtype, {variant: seconds per training epoch}, JAX / fastest PyTorch) per experiment
    of one bench file: its per-1,000-image medians scaled to the dataset's training-set size."""
    dtype = re.search(r"--dtype[= ](\S+)", data["command"])
    rows = []
    for exp, e in data["experiments"].items():
        toml = configs.available().get(exp)
        dataset = tomllib.loads(toml.read_text()).get("dataset") if toml else None
        per = TRAIN_IMAGES.get(dataset, 1000) / 1000
        t = {v: x["per_1000_images_s"] * per for v, x in e["variants"].items()}
        best = min((v for v in t if v.startswith("torch")), key=t.get, default=None)
        ratio = f"{t['jax'] / t[best]:.2f} (vs {best})" if best and "jax" in t else "—"
        # The dtype the JAX variant ran (older files: only the command line says it).
        used = (e.get("jax_perf") or {}).get("dtype") or (dtype.group(1) if dtype else "float32")
        rows.append((exp, used, t, ratio))
    return rows


def deviations(runs: list[Run]) -> list[str]:
    """The ways our runs differ from the paper's protocol, as bullet texts."""
    out = ["**Epochs**: the tables' main rows follow the experiments' own protocol (their TOML: 25 "
           "epochs, as in the paper); runs with fewer epochs or other settings appear only under *Shorter "
           "or changed protocols*, with what differs.",
           "**Hardware**: the paper timed one NVIDIA P100; each of our rows names its hardware. Seconds per "
           "epoch compare hardware and software together, not the code alone.",
           "**Eval splits**: " + "; ".join(sorted({f"{r.cfg.get('dataset')}: `{r.cfg.get('eval_split')}`"
                                                   for r in runs})) + ". Tiny ImageNet's test labels are not "
           "public, so its eval split is the 10,000-image validation set. Runs written before the `eval_*` "
           "metric names call these numbers `test_*`; they are the same eval-split metrics."]
    arrays = sorted({r.hardware for r in runs if r.summary.get("versions", {}).get("tfds", "") is None})
    if arrays:
        out.append(f"**Data source**: the runs on {', '.join(arrays)} had no TensorFlow and read the data "
                   "from an `.npz` (`--arrays`) instead of tfds; how it was made is in their folder's README.")
    notes: dict[str, set] = {}
    for r in runs:
        for note in r.provenance.get("notes", []):
            notes.setdefault(note, set()).add(r.hardware)
    return out + [f"**{', '.join(sorted(hw))}**: {note}" for note, hw in notes.items()]
