"""One command reproduces the paper: `python -m jaxbench.reproduce`.

Runs every (experiment, seed) of a suite (`experiments/suites/paper.toml`: the paper's four
experiments, three seeds; `--include-densenet` adds the two DenseNet-BC ones) that is not finished
yet under one folder (default `results/reproduce/`), then writes the paper report there:

    <out>/runs/<exp>/seed<S>/   metrics.jsonl + summary.json of each run (as `jaxbench.run` writes)
    <out>/runs/<exp>/summary.json   the experiment's seed-group summary (mean ± std)
    <out>/README.md, curves_*.png   `python -m jaxbench.report paper <out>/runs --out <out>`
    <out>/provenance.json       commit, dirty flag, versions, device, command lines, start/end times
    <out>/checkpoints/          only while a run is unfinished (kept with --keep-checkpoints)

Before it starts it prints the plan: each run, its epochs and an estimated time from a short timed
warm-up of each model through the real Trainer on this machine. Each run is a subprocess
(`python -m jaxbench.run`: on an accelerator the seeds vmapped as one program with `--seeds`; on a
CPU one seed at a time, see `auto_grouping`), so JAX state never leaks from one run into the next
and an interrupted suite resumes naturally: rerun the same command after Ctrl-C or kill -9 and finished
runs are skipped (their summary.json holds every epoch), an unfinished one continues from its last
checkpoint (`--resume`), and the final numbers are those of an uninterrupted suite. The data are
checked (prepared, opened) before any training; a dataset that cannot be had ends the command at
once with one message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Sequence

from jaxbench import config as config_lib
from jaxbench.cli import add_perf_args, fail, positive_int, seed_list
from jaxbench.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = "paper"
DEFAULT_OUT = "results/reproduce"
# Per dataset: the flag of its folder of official files and of its exported arrays.
DATA_FLAGS = {"fashion_mnist": ("--fmnist-dir", "--fmnist-arrays"),
              "tiny_imagenet": ("--tiny-dir", "--tiny-arrays")}
SIZES = {"fashion_mnist": (60_000, 10_000), "tiny_imagenet": (100_000, 10_000)}  # train, eval
SHAPES = {"fashion_mnist": (28, 28, 1), "tiny_imagenet": (64, 64, 3)}
PERF_FLAGS = ("dtype", "steps_per_call", "stem_conv", "xla_cpu")
EXIT_USAGE, EXIT_DIVERGED, EXIT_OUTPUT, EXIT_INTERRUPTED = 2, 3, 4, 130
ENV_PARENT = "JAXBENCH_REPRODUCE_PARENT"  # the suite's pid: a child started after it died exits
ENV_RUN_DIR = "JAXBENCH_REPRODUCE_RUN_DIR"  # a one-seed run's folder under --out: <exp>/seed<S>
LOCK = ".reproduce.lock"


class SuiteError(ConfigError):
    """A bad suite file, filter or output folder: one message, exit 2."""


# --- The suite file --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Suite:
    path: Path
    description: str
    experiments: tuple[str, ...]  # experiment names, or absolute paths of .toml files
    seeds: tuple[int, ...]
    optional: dict[str, tuple[str, ...]]  # group -> experiments, added by --include-<group>


def suites_dir() -> Path:
    """`experiments/suites/`: beside the experiments but out of their `*.toml` glob."""
    return config_lib.experiments_dir() / "suites"


def load_suite(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.is_file():
        path = suites_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in suites_dir().glob("*.toml")) if suites_dir().is_dir() else []
            raise SuiteError(f"unknown suite {name_or_path!r} (--suite): pass one of "
                             f"{', '.join(known) or 'none found in ' + str(suites_dir())} or a "
                             "path to a suite .toml file.")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SuiteError(f"{path}: not a readable TOML suite file ({err}).") from None
    unknown = set(raw) - {"description", "experiments", "seeds", "optional"}
    if unknown:
        raise SuiteError(f"{path}: unknown keys {sorted(unknown)}; a suite has description, "
                         "experiments, seeds and an optional [optional] table.")

    def entries(value, key: str) -> tuple[str, ...]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise SuiteError(f"{path}: {key} must be a non-empty list of experiment names or "
                             f".toml paths, got {value!r}.")
        # A path is relative to the suite file; a name is looked up in experiments/.
        return tuple(str((path.parent / v).resolve()) if v.endswith(".toml") else v
                     for v in value)

    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SuiteError(f"{path}: seeds must be a non-empty list of distinct integers >= 0, "
                         f"got {seeds!r}.")
    optional = raw.get("optional", {})
    if not isinstance(optional, dict):
        raise SuiteError(f"{path}: [optional] must be a table of experiment lists.")
    return Suite(path, str(raw.get("description", "")), entries(raw.get("experiments"), "experiments"),
                 tuple(seeds), {k: entries(v, f"optional.{k}") for k, v in optional.items()})


def _names(items: list[str] | None) -> list[str]:
    """`--only a,b --only c` -> [a, b, c]."""
    return [n.strip() for item in items or [] for n in item.split(",") if n.strip()]


def select(suite: Suite, names: dict[str, str], only: list[str], skip: list[str],
           include: list[str]) -> list[str]:
    """The suite's experiments (entries) to run, in suite order, after the filters.

    `names` maps each entry to its experiment name. `--only` may name an optional experiment
    directly; `--include-<group>` adds the whole group.
    """
    every = list(suite.experiments) + [e for group in suite.optional.values() for e in group]
    valid = [names[e] for e in every]
    for flag, given in (("--only", only), ("--skip", skip)):
        bad = [n for n in given if n not in valid]
        if bad:
            raise SuiteError(f"{flag}: {', '.join(bad)} not in the suite {suite.path.name}; its "
                             f"experiments are {', '.join(valid)}.")
    for group in include:
        if group not in suite.optional:
            raise SuiteError(f"--include-{group}: the suite {suite.path.name} has no optional "
                             f"group {group!r}.")
    if only:
        chosen = [e for e in every if names[e] in only]
    else:
        chosen = list(suite.experiments) + [e for g in include for e in suite.optional[g]]
    chosen = [e for e in dict.fromkeys(chosen) if names[e] not in skip]
    if not chosen:
        raise SuiteError("--only/--skip left no experiment to run.")
    return chosen


# --- Where things go -------------------------------------------------------------------------------

def seed_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def checkpoint_dir(out: Path, name: str, seeds: Sequence[int], mode: str) -> Path:
    """One folder per group (`seeds-0-1-2`) or per one-seed run (`seed-0`)."""
    tag = f"seeds-{'-'.join(map(str, seeds))}" if mode == "group" else f"seed-{seeds[0]}"
    return out / "checkpoints" / name / tag


def has_checkpoint(folder: Path) -> bool:
    """Whether orbax committed a step there (its step folders are named by the step number)."""
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def checkpointed_groups(out: Path, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(mode, seeds) of every run of `name` that left a checkpoint, oldest folder name first."""
    found = []
    folder = out / "checkpoints" / name
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        kind, _, rest = sub.name.partition("-")
        try:
            seeds = tuple(int(s) for s in rest.split("-"))
        except ValueError:
            continue
        if kind in ("seeds", "seed") and has_checkpoint(sub):
            found.append(("group" if kind == "seeds" else "single", seeds))
    return found


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@dataclasses.dataclass
class SeedState:
    seed: int
    epochs_done: int = 0
    finished: bool = False


def seed_state(out: Path, cfg: Config, seed: int) -> SeedState:
    """How far a seed's run is, from its summary.json; SuiteError if it used other settings."""
    folder = seed_folder(out, cfg.name, seed)
    summary = _read_json(folder / "summary.json")
    if summary is None:
        return SeedState(seed)
    want = _normal(cfg.replace(seed=seed).to_dict())
    have = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if have != want:
        keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        shown = ", ".join(f"{k} {have.get(k)!r} there, {want.get(k)!r} here" for k in keys)
        raise SuiteError(f"{folder} holds a run made with other settings ({shown}). One --out "
                         "folder holds one protocol: pass another --out, or delete that folder "
                         "to redo it.")
    done = int(summary.get("epochs_completed") or 0)
    return SeedState(seed, done, done >= cfg.epochs and "params_sha256" in summary)


# --- The plan --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One subprocess: `python -m jaxbench.run` for a seed group, or for one seed."""

    exp: str  # what --exp gets: a name or a .toml path
    cfg: Config
    seeds: tuple[int, ...]
    mode: str  # "group" (--seeds, vmapped) or "single" (--seed)
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
    """Seeds that never ran: one vmapped group, or one run per seed."""
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
    train, evaluate = sizes
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
    """`--grouping auto`: seeds as one vmapped program on an accelerator, one after another on
    XLA:CPU, where one step of a vmapped group took 14-27x as long as one seed's step, 6-9x per
    seed (BaselineCNN, groups of 2 and 3, warm-ups on a busy 2-core AMD EPYC, 2026-11-27): there a
    group costs far more than it saves."""
    if backend == "cpu":
        return {"mode": "sequential", "reason": "auto on CPU: XLA:CPU runs a vmapped seed group "
                "many times slower per seed than one seed alone; --grouping group forces groups"}
    if backend is None:
        return {"mode": "group", "reason": "auto, device unknown here (a dry run without the "
                "warm-up): seeds vmapped as one program unless the device is a CPU"}
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


# --- Subprocesses ----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In a child: die with the suite (Linux: PR_SET_PDEATHSIG), so a kill -9 of the suite never
    leaves a run writing into the folder that the rerun resumes."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(ENV_PARENT)
    if parent and os.getppid() != int(parent):
        os._exit(137)  # the suite died before prctl took effect


def child_run() -> None:
    """Entry of each run subprocess: `python -m jaxbench.run` with the arguments given.

    A one-seed run writes into `<out>/<exp>/seed<S>`, as a member of a seed group would, so every
    run of the suite has the same layout (`ENV_RUN_DIR` names that folder under --out).
    """
    _die_with_parent()
    from jaxbench import run

    folder = os.environ.pop(ENV_RUN_DIR, None)
    if folder:
        run.run_name = lambda *args, **kwargs: folder
    sys.exit(run.main(sys.argv[1:]))


class Children:
    """Starts children in their own process group (a terminal's Ctrl-C reaches the suite only,
    which forwards exactly one SIGINT per Ctrl-C: the run saves a checkpoint and exits 130), with
    the suite's lock inherited so no second suite can start while one of them lives."""

    def __init__(self, lock_fd: int | None):
        self.lock_fd = lock_fd
        self.interrupted = False

    def run(self, argv: list[str], env: dict | None = None) -> int:
        kwargs: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}
        if self.lock_fd is not None:
            kwargs["pass_fds"] = (self.lock_fd,)
        proc = subprocess.Popen(argv, env={**os.environ, ENV_PARENT: str(os.getpid()),
                                           **(env or {})}, **kwargs)

        def forward(signum, frame):
            self.interrupted = True
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    return proc.wait()
                except KeyboardInterrupt:  # pragma: no cover - the handler above takes SIGINT
                    forward(signal.SIGINT, None)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def python_c(function: str) -> list[str]:
    return [sys.executable, "-c", f"from jaxbench.reproduce import {function}; {function}()"]


def acquire_lock(out: Path, wait_s: float = 20.0) -> int | None:
    """An exclusive lock on the folder (None where fcntl does not exist). A killed suite's run may
    take a moment to die (it holds the lock too): wait for it, then give up with SuiteError."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                holder = path.read_text().strip() or "?"
                os.close(fd)
                raise SuiteError(f"another `python -m jaxbench.reproduce` (pid {holder}), or a run "
                                 f"it started, is still using {out}. Wait for it to end or stop "
                                 "it; two suites never share a folder.") from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


# --- The probe: data check, device, warm-up (a subprocess, so the suite itself never holds a GPU) --

def probe() -> None:
    """Entry of the probe subprocess: argv = request.json result.json. Writes the result as it goes."""
    _die_with_parent()
    request = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    result: dict[str, Any] = {"data": {}, "timing": {}, "errors": {}}

    def save():
        tmp = result_path.with_name(result_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, result_path)

    from jaxbench.cli import enable_compile_cache

    enable_compile_cache()
    import jax

    from jaxbench import outputs

    result |= outputs.environment_info()
    result["backend"] = jax.default_backend()
    save()
    for dataset, spec in request["data"].items():
        print(f"data: checking {dataset} (prepared once by tfds if it is not yet; this can take "
              "minutes the first time)", flush=True)
        result["data"][dataset] = check_dataset(dataset, spec)
        save()
    if any("error" in v for v in result["data"].values()):
        return
    for item in request["warmup"]:
        try:
            result["timing"][item["name"]] = warm_up(item, request["budget_s"])
        except Exception as err:  # noqa: BLE001  an estimate is never worth failing the suite
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            result["errors"][item["name"]] = f"{type(err).__name__}: {first}"
        save()


def check_dataset(dataset: str, spec: dict) -> dict:
    """Prepare (or open) one dataset the way the runs will, and read one example of each split."""
    from jaxbench import data

    try:
        cfg = config_lib.load(spec["exp"]).replace(train_limit=1, eval_limit=1)
        if spec.get("arrays"):
            import numpy as np

            data.load_arrays(spec["arrays"], cfg)
            with np.load(spec["arrays"]) as z:
                sizes = [len(z["train_labels"]), len(z["eval_labels"])]
            return {"sizes": sizes, "source": f"arrays {spec['arrays']}"}
        if data.have_tfds():
            b = data.prepare(dataset, spec.get("data_dir"), spec.get("manual_dir"))
            data.load_split(b, cfg.train_split, 1)
            data.load_split(b, cfg.eval_split, 1)
            sizes = [b.info.splits[s].num_examples for s in (cfg.train_split, cfg.eval_split)]
            return {"sizes": sizes, "source": f"tfds in {b.data_dir}"}
        data.load_files(cfg, spec.get("data_dir"), spec.get("manual_dir"))
        return {"sizes": list(SIZES[dataset]), "source": f"official files in {spec.get('manual_dir')}"}
    except (data.DataError, ConfigError) as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001  anything else that stops the data: say what
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
        return {"error": f"{type(err).__name__}: {first}"}


def warm_up(item: dict, budget_s: float) -> dict:
    """Time the real Trainer on random images of the dataset's shape: setup (speed self-check,
    compile), then train steps after one warm call until `budget_s` passes, then eval batches.
    Only seconds matter here: the images' content does not change a step's time."""
    import jax
    import numpy as np

    from jaxbench import data
    from jaxbench.trainer import Trainer

    cfg = config_lib.load(item["exp"]).replace(**item["overrides"])
    cpu = jax.default_backend() == "cpu"
    rng = np.random.default_rng(0)
    shape = tuple(item["shape"])

    def split(n):
        return data.Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                          rng.integers(0, cfg.num_classes, n).astype(np.int32))

    # CPU: one step per call, the budget stops it; elsewhere a few 50-step calls.
    train = split(cfg.batch_size * (64 if cpu else 512))
    test = split(cfg.batch_size * (4 if cpu else 64))
    auto = "single" if cpu else "group"
    modes = sorted({auto if m == "auto" else m for m in item["modes"]}, reverse=True)  # single first
    out, record = {}, None
    for mode in modes:
        seeds = tuple(item["seeds"]) if mode == "group" else None
        t0 = time.perf_counter()
        trainer = Trainer(cfg, train, test, seeds=seeds, perf_record=record)
        init_s = time.perf_counter() - t0
        state = trainer.init_state()
        compile_s = trainer.compile(state)
        def calls(n):  # a `stop` that lets n calls run: it is asked once before each call
            asked = [0]

            def stop():
                asked[0] += 1
                return asked[0] > n
            return stop

        # One call per train_epoch: it returns after the device is done (its NaN check reads
        # the sums), so each call is timed exactly. The first call warms up; the median of the
        # next (at least 3, until the budget is spent, unless one call takes many budgets)
        # shrugs off a spike of a busy machine.
        state, sums, _ = trainer.train_epoch(state, 1, stop=calls(1))
        times, done, t1 = [], 0, time.perf_counter()
        while len(times) < 200:
            elapsed = time.perf_counter() - t1
            if times and (elapsed > 10 * budget_s or (len(times) >= 3 and elapsed > budget_s)):
                break
            t = time.perf_counter()
            state, sums, n = trainer.train_epoch(state, 2 + len(times), stop=calls(1))
            times.append((time.perf_counter() - t) / n)
            done += n
        step_s = statistics.median(times)
        trainer.evaluate(state)  # warm
        t2 = time.perf_counter()
        trainer.evaluate(state)
        eval_batch_s = (time.perf_counter() - t2) / len(trainer.eval_idx)
        setup_s = init_s + compile_s + (out["single"]["init_s"] if record is not None else 0.0)
        out[mode] = {"seeds": len(trainer.seeds), "init_s": init_s, "compile_s": compile_s,
                     "setup_s": setup_s, "step_s": step_s, "steps_timed": done,
                     "eval_batch_s": eval_batch_s, "perf": trainer.perf.line()}
        print(f"warm-up: {cfg.name}, {'group of ' + str(len(trainer.seeds)) if seeds else 'one seed'}:"
              f" {step_s * 1000:.1f} ms per train step (median of {len(times)} calls, {done} steps),"
              f" {eval_batch_s * 1000:.1f} ms per eval batch, setup {setup_s:.1f} s", flush=True)
        record = trainer.perf.to_dict() if mode == "single" else record
        del trainer, state, sums
    return out


# --- Provenance ------------------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside a checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def provenance_notes(prov: dict) -> list[str]:
    """What a reader of the report must know: a suite run over several commits, or dirty."""
    invocations = prov.get("invocations", [])
    commits = list(dict.fromkeys(s.get("commit") for s in invocations if s.get("commit")))
    notes = []
    if len(commits) > 1:
        notes.append("this suite ran in several invocations at different commits ("
                     + ", ".join(c[:7] for c in commits) + "); see provenance.json")
    if any(s.get("dirty") for s in invocations):
        notes.append("at least one invocation ran from a checkout with uncommitted changes "
                     "(provenance.json: dirty)")
    devices = list(dict.fromkeys(json.dumps(s["device"], sort_keys=True) for s in invocations
                                 if s.get("device")))
    if len(devices) > 1:
        notes.append("this suite's invocations ran on different devices; see provenance.json")
    return notes


# --- The command -----------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.reproduce",
                                description=__doc__.split("\n")[0])
    p.add_argument("--suite", default=DEFAULT_SUITE,
                   help=f"a suite in experiments/suites/ or a path to one (default: {DEFAULT_SUITE})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the suite's folder (default: {DEFAULT_OUT})")
    p.add_argument("--only", action="append", metavar="EXP[,EXP]", help="run only these experiments")
    p.add_argument("--skip", action="append", metavar="EXP[,EXP]", help="leave these out")
    p.add_argument("--include-densenet", action="store_true",
                   help="add the suite's optional DenseNet-BC experiments")
    p.add_argument("--seeds", type=seed_list, help="override the suite's seeds (0,1,2 or a count)")
    p.add_argument("--epochs", type=positive_int, help="override every experiment's epoch count "
                   "(a short trial; one --out folder holds one protocol)")
    g = p.add_argument_group("data (taken once, checked before any training)")
    g.add_argument("--data-dir", help="tfds data_dir (default: tfds' own, ~/tensorflow_datasets); "
                   "without TensorFlow, where decoded arrays are cached")
    g.add_argument("--fmnist-dir", help="folder with the four official Fashion-MNIST files")
    g.add_argument("--tiny-dir", help="folder with tiny-imagenet-200.zip (or its extracted folder, "
                   "or the two tar.gz archives)")
    g.add_argument("--fmnist-arrays", help="Fashion-MNIST from an .npz of `python -m jaxbench.data "
                   "export` instead")
    g.add_argument("--tiny-arrays", help="Tiny ImageNet from an .npz of `python -m jaxbench.data "
                   "export` instead")
    p.add_argument("--grouping", choices=("auto", "group", "sequential"), default="auto",
                   help="seeds as one vmapped program (group) or one after another (sequential); "
                   "auto: groups on an accelerator, one after another on a CPU. Decided once per "
                   "experiment and suite folder, kept when it resumes")
    p.add_argument("--dry-run", action="store_true", help="print the plan (with estimates) and exit")
    p.add_argument("--no-estimate", action="store_true", help="skip the timed warm-up")
    p.add_argument("--warmup-seconds", type=float, default=3.0,
                   help="seconds of timed train steps per model in the warm-up (default 3)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's checkpoints once it is finished (default: delete them)")
    add_perf_args(p)
    return p


def data_spec(dataset: str, exp: str, args) -> dict:
    folder_flag, arrays_flag = DATA_FLAGS[dataset]
    arrays = getattr(args, arrays_flag[2:].replace("-", "_"))
    manual = getattr(args, folder_flag[2:].replace("-", "_"))
    return {"exp": exp, "arrays": arrays, "manual_dir": manual, "data_dir": args.data_dir}


def data_args(spec: dict) -> list[str]:
    if spec["arrays"]:
        return ["--arrays", spec["arrays"]]
    return ((["--data-dir", spec["data_dir"]] if spec["data_dir"] else [])
            + (["--manual-dir", spec["manual_dir"]] if spec["manual_dir"] else []))


def describe_source(dataset: str, spec: dict) -> str:
    folder_flag, arrays_flag = DATA_FLAGS[dataset]
    if spec["arrays"]:
        return f"{arrays_flag} {spec['arrays']}"
    where = f"tfds data dir {spec['data_dir'] or '(tfds default)'}"
    if spec["manual_dir"]:
        return f"{folder_flag} {spec['manual_dir']} (prepared into the {where})"
    return f"the {where}, or tfds' download when online"


def perf_args(args) -> list[str]:
    out = []
    for key in PERF_FLAGS:
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_argv(job: Job, out: Path, args, spec: dict) -> tuple[list[str], dict]:
    """The `jaxbench.run` arguments of a job, and the environment it needs."""
    argv = ["--exp", job.exp, "--out", str(out / "runs"),
            "--checkpoint-dir", str(checkpoint_dir(out, job.name, job.seeds, job.mode))]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += data_args(spec) + perf_args(args)
    env = {}
    if job.mode == "group":
        argv += ["--seeds", ",".join(map(str, job.seeds)) + ("," if len(job.seeds) == 1 else "")]
    else:
        argv += ["--seed", str(job.seeds[0])]
        env[ENV_RUN_DIR] = f"{job.name}/seed{job.seeds[0]}"
    return argv + (["--resume"] if job.resume else []), env


def array_sizes(path: str | None) -> tuple[int, int] | None:
    if not path:
        return None
    try:
        import numpy as np

        with np.load(path) as z:
            return len(z["train_labels"]), len(z["eval_labels"])
    except (OSError, KeyError, ValueError):
        return None


def print_plan(suite: Suite, out: Path, seeds, jobs: list[Job], finished: list[tuple[str, list[int]]],
               specs: dict, probe_result: dict | None, grouping: dict, args, estimated: bool) -> None:
    epochs = f"{args.epochs} (--epochs)" if args.epochs else "each experiment's own"
    print(f"jaxbench.reproduce: suite {suite.path.name} -> {out}  (seeds "
          f"{','.join(map(str, seeds))}; epochs: {epochs})")
    for dataset, spec in specs.items():
        print(f"  data {dataset}: {describe_source(dataset, spec)}")
    if probe_result and probe_result.get("device"):
        d = probe_result["device"]
        host = f"{d.get('cpu')}, {d.get('cores')} cores"
        print(f"  device: cpu ({host})" if d.get("platform") == "cpu" else
              f"  device: {d.get('count')}x {d.get('name')} ({d.get('platform')}; host {host})")
    rows = [("run", "seeds", "how", "epochs", "status", "estimate")]
    for name, done in finished:
        rows.append((name, ",".join(map(str, done)), "", "", "finished: skipped", ""))
    total = 0.0
    for job in jobs:
        e = job.estimate
        total += e["total_s"] if e else 0.0
        rows.append((job.name, ",".join(map(str, job.seeds)),
                     "vmapped group" if job.mode == "group" else "one seed",
                     str(job.cfg.epochs),
                     f"resume at epoch {job.epochs_done + 1}" if job.resume else "start",
                     f"{fmt_s(e['total_s'])} = {e['epochs']} x {fmt_s(e['epoch_s'])} + setup "
                     f"{fmt_s(e['setup_s'])}" if e else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print()
    ways: dict[tuple[str, str], list[str]] = {}
    for name, g in grouping.items():
        ways.setdefault((g["mode"], g["reason"]), []).append(name)
    for (mode, reason), exps in ways.items():
        print(f"  {', '.join(exps)}: seeds {'as one vmapped group' if mode == 'group' else 'one after another'}"
              f" ({reason})")
    if not jobs:
        print("  nothing to run: every run is finished.")
    elif estimated and all(j.estimate for j in jobs):
        print(f"  ESTIMATED total: {fmt_s(total)}. An estimate: a short timed warm-up of each model "
              "(the real Trainer on random images, this machine) extrapolated to every train step "
              "and eval batch of the remaining epochs; loading the data is not included.")
    elif estimated:
        print("  no estimate for some runs (their warm-up failed, see above).")
    sys.stdout.flush()


def assemble_group_summary(out: Path, name: str, seeds: Sequence[int]) -> None:
    """The experiment's summary.json over all its finished seeds, when they ran in more than one
    program (one seed at a time, or groups of different sizes); a single group wrote its own."""
    folder = out / "runs" / name
    summaries, histories = [], []
    for s in seeds:
        summary = _read_json(folder / f"seed{s}" / "summary.json")
        if summary is None:
            return
        summaries.append(summary)
        rows = (folder / f"seed{s}" / "metrics.jsonl").read_text().splitlines()
        histories.append([json.loads(r) for r in rows if r.strip()])
    if summaries and all(s.get("seed_group") == list(seeds) for s in summaries):
        return  # one group wrote it
    from jaxbench import outputs

    # Several programs: the group's epoch time is the sum of theirs (the twin's convention).
    group = outputs.group_summary([s | {"sequential": True} for s in summaries], histories)
    group["assembled_by"] = "jaxbench.reproduce (seeds trained in separate programs)"
    write_json_atomic(folder / "summary.json", group)


def write_report(out: Path, children: Children) -> bool:
    code = children.run([sys.executable, "-m", "jaxbench.report", "paper", str(out / "runs"),
                         "--out", str(out)])
    if code != 0:
        print(f"warning: the report failed (exit {code}); rerun it with python -m jaxbench.report "
              f"paper {out / 'runs'} --out {out}", file=sys.stderr)
    return code == 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the runs: nothing to save
        print("\ninterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    started, t0 = now(), time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = "python -m jaxbench.reproduce" + (" " + shlex.join(argv) if argv else "")
    if args.warmup_seconds <= 0:
        return fail(f"--warmup-seconds must be > 0, got {args.warmup_seconds}")
    for dataset, (folder_flag, arrays_flag) in DATA_FLAGS.items():
        if getattr(args, folder_flag[2:].replace("-", "_")) and getattr(args, arrays_flag[2:].replace("-", "_")):
            return fail(f"{folder_flag} and {arrays_flag} both name {dataset}'s data; pass one.")
    out = Path(args.out)
    try:
        suite = load_suite(args.suite)
        overrides = {"epochs": args.epochs, **{k: getattr(args, k) for k in PERF_FLAGS}}
        every = list(suite.experiments) + [e for g in suite.optional.values() for e in g]
        cfgs = {e: config_lib.load(e).replace(**overrides) for e in every}
        names = {e: cfgs[e].name for e in every}
        include = ["densenet"] if args.include_densenet else []
        chosen = select(suite, names, _names(args.only), _names(args.skip), include)
        whole = select(suite, names, [], [], include)  # what "complete" means in provenance
        seeds = list(args.seeds or suite.seeds)
        if out.exists() and not out.is_dir():
            raise SuiteError(f"--out {out} is a file; pass a folder.")
        lock_fd = None
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
            lock_fd = acquire_lock(out)
        prov = _read_json(out / "provenance.json") or {}
        recorded = prov.get("grouping", {})
        resumed, pending, finished, states = {}, {}, [], {}
        for e in chosen:
            jobs_e, todo, st = plan_experiment(out, e, cfgs[e], seeds)
            resumed[e], pending[e], states[e] = jobs_e, todo, {s.seed: s for s in st}
            done = [s.seed for s in st if s.finished]
            if done:
                finished.append((names[e], done))
    except ConfigError as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"--out {out}: {err}")
    children = Children(lock_fd)
    needed = [e for e in chosen if resumed[e] or pending[e]]
    specs = {}
    for e in needed:
        specs.setdefault(cfgs[e].dataset, data_spec(cfgs[e].dataset, e, args))
    sizes = {ds: array_sizes(spec["arrays"]) or SIZES[ds] for ds, spec in specs.items()}

    # Data (not in a dry run), device and warm-up: one subprocess, data first.
    probe_result = None
    estimated = bool(needed) and not args.no_estimate
    if needed and (estimated or not args.dry_run):
        warm = [warmup_item(e, cfgs[e], resumed[e], pending[e], overrides, args.grouping if
                            args.grouping != "auto" else (recorded.get(names[e]) or {}).get("mode"))
                for e in (needed if estimated else [])]
        request = {"data": {} if args.dry_run else specs, "warmup": warm,
                   "budget_s": args.warmup_seconds}
        if warm:
            print(f"The estimate: a timed warm-up of {len(warm)} experiment(s) on this machine "
                  f"(~{args.warmup_seconds:g} s of train steps per model, plus compiling), after "
                  "the data check.", flush=True)
        with tempfile.TemporaryDirectory(prefix="jaxbench-reproduce-") as tmp:
            (Path(tmp) / "request.json").write_text(json.dumps(request))
            code = children.run(python_c("probe") + [str(Path(tmp) / "request.json"),
                                                      str(Path(tmp) / "result.json")])
            probe_result = _read_json(Path(tmp) / "result.json")
        if children.interrupted:
            print("interrupted before any training; nothing was changed.", file=sys.stderr)
            return EXIT_INTERRUPTED
        if probe_result is None:
            print(f"error: the data and device check crashed (exit {code}) before it could say "
                  "why; see the messages above.", file=sys.stderr)
            return 1
        if code != 0:
            print(f"warning: the warm-up ended early (exit {code}); estimates may be missing.",
                  file=sys.stderr)
        bad = {ds: r["error"] for ds, r in probe_result["data"].items() if "error" in r}
        if bad:
            users = {ds: [names[e] for e in needed if cfgs[e].dataset == ds] for ds in bad}
            lines = [f"  - {ds} (for {', '.join(users[ds])}): {msg}" for ds, msg in bad.items()]
            return fail("the data for this suite cannot be had; nothing was trained.\n"
                        + "\n".join(lines) + "\nPass --fmnist-dir / --tiny-dir (folders with the "
                        "official files), --data-dir (a tfds folder where they are prepared) or "
                        "--fmnist-arrays / --tiny-arrays; without them tfds downloads when online.")
        for ds, r in probe_result["data"].items():
            sizes[ds] = tuple(r["sizes"])
        for name, msg in probe_result.get("errors", {}).items():
            print(f"warning: the warm-up of {name} failed ({msg}); no estimate for it.",
                  file=sys.stderr)

    timing = (probe_result or {}).get("timing", {})
    backend = (probe_result or {}).get("backend")
    if backend is None and args.dry_run and needed:  # no probe ran: a dry run may ask JAX here
        import jax

        backend = jax.default_backend()
    grouping, jobs = {}, []
    for e in chosen:
        cfg, name = cfgs[e], names[e]
        if pending[e]:
            grouping[name] = decide_grouping(pending[e], args.grouping, recorded.get(name), backend)
        mode = grouping.get(name, {}).get("mode", "group")
        for job in resumed[e] + new_jobs(e, cfg, pending[e], mode, out, states[e]):
            job.estimate = estimate(job, timing.get(name), sizes[cfg.dataset])
            jobs.append(job)
    print_plan(suite, out, seeds, jobs, finished, specs, probe_result, grouping, args, estimated)
    if args.dry_run:
        return 0

    # The runs.
    git = git_state()
    invocation = {"started": started, "ended": None, "status": "running", "command": command,
               "cwd": os.getcwd(), **git, "device": (probe_result or {}).get("device"),
               "versions": (probe_result or {}).get("versions"), "runs": []}
    if not prov:
        prov = {"kind": "jaxbench.reproduce", "suite": str(suite.path), "experiments":
                [names[e] for e in chosen], "seeds": seeds, "epochs": args.epochs,
                "command": command, **git, "date": started[:10], "started": started,
                "finished": None, "status": "running", "device": invocation["device"],
                "versions": invocation["versions"], "grouping": {}, "invocations": []}
    prov["experiments"] = list(dict.fromkeys(prov.get("experiments", []) + [names[e] for e in chosen]))
    prov["grouping"] = {**prov.get("grouping", {}), **grouping}
    prov.setdefault("invocations", []).append(invocation)
    prov["device"] = prov.get("device") or invocation["device"]
    prov["versions"] = prov.get("versions") or invocation["versions"]

    def save(status: str) -> None:
        invocation["status"], invocation["ended"] = status, (now() if status != "running" else None)
        if status != "running":
            invocation["seconds"] = round(time.monotonic() - t0, 1)
        complete = all(seed_state(out, cfgs[e], s).finished for e in whole for s in seeds)
        prov["status"] = ("complete" if complete else "partial") if status == "done" else status
        prov["finished"] = invocation["ended"] if prov["status"] == "complete" else None
        notes = provenance_notes(prov)
        if notes:
            prov["notes"] = notes
        write_json_atomic(out / "provenance.json", prov)

    save("running")
    try:
        exit_code = run_jobs(jobs, out, args, specs, seeds, children, invocation, save, command)
    except KeyboardInterrupt:  # Ctrl-C between two runs (during one, the run takes it)
        exit_code = EXIT_INTERRUPTED
        print(f"\ninterrupted between runs. Rerun the same command to continue:\n  {command}",
              file=sys.stderr)
    status = {0: "done", EXIT_INTERRUPTED: "interrupted", EXIT_DIVERGED: "diverged"}.get(exit_code, "failed")
    save(status)
    if not args.keep_checkpoints:
        for e in chosen:  # the folders of finished runs' checkpoints, once empty
            for folder in (out / "checkpoints" / names[e], out / "checkpoints"):
                try:
                    folder.rmdir()
                except OSError:
                    pass
    print(f"\njaxbench.reproduce: {prov['status']} in {fmt_s(time.monotonic() - t0)} "
          f"({len(invocation['runs'])} run(s) this invocation). Report: {out / 'README.md'}; "
          f"provenance: {out / 'provenance.json'}", flush=True)
    return exit_code


def run_jobs(jobs: list[Job], out: Path, args, specs: dict, seeds: list[int], children: Children,
             invocation: dict, save, command: str) -> int:
    """Each job in a subprocess; the report after each finished experiment and at the end."""
    diverged, report_stale = [], False
    for i, job in enumerate(jobs, 1):
        run_args, env = run_argv(job, out, args, specs[job.cfg.dataset])
        print(f"\n=== [{i}/{len(jobs)}] {job.name}, seed{'s' * (len(job.seeds) > 1)} "
              f"{','.join(map(str, job.seeds))}: python -m jaxbench.run {shlex.join(run_args)}",
              flush=True)
        t1 = time.monotonic()
        code = children.run(python_c("child_run") + run_args, env)
        invocation["runs"].append({"experiment": job.name, "seeds": list(job.seeds), "mode": job.mode,
                                "resumed": job.resume, "exit": code,
                                "seconds": round(time.monotonic() - t1, 1)})
        experiment_done = False
        if code == 0 and all(seed_state(out, job.cfg, s).finished for s in job.seeds):
            report_stale = True
            if not args.keep_checkpoints:
                _remove_tree(checkpoint_dir(out, job.name, job.seeds, job.mode))
            if all(seed_state(out, job.cfg, s).finished for s in seeds):
                assemble_group_summary(out, job.name, seeds)
                experiment_done = True
        if children.interrupted or code == EXIT_INTERRUPTED:
            print(f"\ninterrupted: {job.name} saved a checkpoint. Rerun the same command to "
                  f"continue where it stopped:\n  {command}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if code == EXIT_DIVERGED:
            diverged.append(job.name)
            print(f"warning: {job.name} (seeds {','.join(map(str, job.seeds))}) diverged; going on "
                  "with the other runs.", file=sys.stderr)
        elif code != 0:
            what = {EXIT_USAGE: "bad input (see the message above)",
                    EXIT_OUTPUT: "writing its outputs failed (see above)"}.get(
                        code, f"it crashed (exit {code})" if code > 0 else f"it was killed by signal {-code}")
            print(f"error: {job.name} (seeds {','.join(map(str, job.seeds))}) stopped: {what}. "
                  f"Finished runs are kept; fix the cause and rerun:\n  {command}", file=sys.stderr)
            return code if code in (EXIT_USAGE, EXIT_OUTPUT) else 1
        save("running")
        if experiment_done and i < len(jobs):  # the report so far: a long suite's early rows
            report_stale = not write_report(out, children)
            if children.interrupted:
                return EXIT_INTERRUPTED
    if report_stale or (not jobs and (out / "runs").is_dir()):
        write_report(out, children)
    return EXIT_DIVERGED if diverged else 0


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
