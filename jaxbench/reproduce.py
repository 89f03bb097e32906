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
(`python -m jaxbench.run --seeds`: on an accelerator the seeds vmapped as one program, on a CPU
looped, each seed's compiled step in turn; see `jaxbench.plan.auto_grouping`), so JAX state
never leaks from one run into the next and an interrupted suite resumes naturally: rerun the same command after Ctrl-C or
kill -9 and finished runs are skipped (their summary.json holds every epoch), an unfinished one
continues from its last checkpoint (`--resume`), and the final numbers are those of an
uninterrupted suite. The data are checked (prepared, opened) before any training; a dataset that
cannot be had ends the command at once with one message and exit code 2.

The parts: `suite` (the suite file, the folder's layout and state), `plan` (jobs, grouping,
estimates), `probe` (data check and warm-up), `children` (subprocesses, the lock), `provenance`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from jaxbench import config as config_lib
from jaxbench.children import Children, acquire_lock, python_c
from jaxbench.cli import add_perf_args, fail, positive_int, seed_list
from jaxbench.config import ConfigError
from jaxbench.perf import Perf
from jaxbench.plan import (SIZES, Job, decide_grouping, estimate, fmt_s, new_jobs, plan_experiment,
                           warmup_item)
from jaxbench.provenance import git_state, now, provenance_notes, write_json_atomic
from jaxbench.suite import (Suite, SuiteError, checkpoint_dir, load_suite, read_json, seed_state,
                            select)

DEFAULT_SUITE = "paper"
DEFAULT_OUT = "results/reproduce"
# Per dataset: the flag of its folder of official files and of its exported arrays.
DATA_FLAGS = {"fashion_mnist": ("--fmnist-dir", "--fmnist-arrays"),
              "tiny_imagenet": ("--tiny-dir", "--tiny-arrays")}
PERF_FLAGS = tuple(f.name for f in dataclasses.fields(Perf))  # each a --flag
EXIT_USAGE, EXIT_DIVERGED, EXIT_OUTPUT, EXIT_INTERRUPTED = 2, 3, 4, 130


# --- The command -----------------------------------------------------------------------------------

def _names(items: list[str] | None) -> list[str]:
    """`--only a,b --only c` -> [a, b, c]."""
    return [n.strip() for item in items or [] for n in item.split(",") if n.strip()]


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
    p.add_argument("--seeds", type=seed_list, help="override the suite's seeds: a list "
                   "(0,1,2; one seed: 1, with the comma) or a count (3 = 0,1,2; so 1 = seed 0)")
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
                   help="an experiment's seeds as one seed group (`run --seeds`: vmapped on an "
                   "accelerator, looped on a CPU) or as separate runs one after another "
                   "(sequential); auto: group. Decided once per experiment and suite folder, "
                   "kept when it resumes")
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
    given = spec["arrays"] or spec["manual_dir"]
    # A dry run checks no data; a path that is not there is still worth saying at once.
    missing = " -- NOT FOUND: a real run stops at the data check" if (
        given and not Path(given).exists()) else ""
    if spec["arrays"]:
        return f"{arrays_flag} {spec['arrays']}{missing}"
    where = f"tfds data dir {spec['data_dir'] or '(tfds default)'}"
    if spec["manual_dir"]:
        return f"{folder_flag} {spec['manual_dir']}{missing} (prepared into the {where})"
    return f"the {where}, or tfds' download when online"


def perf_args(args) -> list[str]:
    out = []
    for key in PERF_FLAGS:
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_argv(job: Job, out: Path, args, spec: dict) -> list[str]:
    """The `jaxbench.run` arguments of a job."""
    argv = ["--exp", job.exp, "--out", str(out / "runs"),
            "--checkpoint-dir", str(checkpoint_dir(out, job.name, job.seeds, job.mode))]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += data_args(spec) + perf_args(args)
    if job.mode == "group":
        argv += ["--seeds", ",".join(map(str, job.seeds)) + ("," if len(job.seeds) == 1 else "")]
    else:
        # One seed's run goes where a group's member would: every run has the same layout.
        argv += ["--seed", str(job.seeds[0]),
                 "--run-dir", str(out / "runs" / job.name / f"seed{job.seeds[0]}")]
    return argv + (["--resume"] if job.resume else [])


def array_sizes(path: str | None) -> tuple[int, int] | None:
    if not path:
        return None
    try:
        from jaxbench.data import open_arrays

        with open_arrays(path) as z:
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
                     "seed group" if job.mode == "group" else "one seed",
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
        print(f"  {', '.join(exps)}: seeds {'as one seed group' if mode == 'group' else 'one after another'}"
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
        summary = read_json(folder / f"seed{s}" / "summary.json")
        if summary is None:
            return
        summaries.append(summary)
        rows = (folder / f"seed{s}" / "metrics.jsonl").read_text().splitlines()
        histories.append([json.loads(r) for r in rows if r.strip()])
    if summaries and all(s.get("seed_group") == list(seeds) for s in summaries):
        return  # one group wrote it
    from jaxbench import outputs

    # Several programs: the group's epoch time is the sum of the seeds' shares.
    group = outputs.group_summary(summaries, histories, separate=True)
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
        prov = read_json(out / "provenance.json") or {}
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
            code = children.run(python_c("jaxbench.probe", "probe")
                                + [str(Path(tmp) / "request.json"), str(Path(tmp) / "result.json")])
            probe_result = read_json(Path(tmp) / "result.json")
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
        run_args = run_argv(job, out, args, specs[job.cfg.dataset])
        print(f"\n=== [{i}/{len(jobs)}] {job.name}, seed{'s' * (len(job.seeds) > 1)} "
              f"{','.join(map(str, job.seeds))}: python -m jaxbench.run {shlex.join(run_args)}",
              flush=True)
        t1 = time.monotonic()
        code = children.run(python_c("jaxbench.children", "child_run") + run_args)
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
