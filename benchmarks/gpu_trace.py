"""Where a train step's time goes on a GPU: a profiler trace of the trainer's compiled calls.

    PYTHONPATH=. python benchmarks/gpu_trace.py --exp tiny_target --arrays tiny.npz --out DIR \
        [--dtype bfloat16] [--stem-conv patches] [--calls 2]

Builds the experiment's JAX trainer exactly as a run does (its steps per call, its compile),
trains one epoch to warm up, then records `--calls` train calls with `jax.profiler` as a Perfetto
trace (plain JSON, no TensorBoard needed) and sums up the device's side of it:

- kernels per train step, and their summed time against the device's wall time over the calls
  (the rest is the GPU idle: launch gaps, host round trips);
- the gaps between one kernel's end and the next one's start (median, total), which give the
  launch-latency floor: kernels per step x the median gap is what a step costs on launches alone;
  and the largest gaps, where and between which kernels (a host round trip between two calls);
- the kernels by total time, with counts, and the same grouped by kind (convolution,
  matmul, fusion, copy, other).

Writes DIR/trace-<exp>-<dtype>.json (the summary) and DIR/trace-<exp>-<dtype>.json.gz (the
trace); with `--stem-conv`, trace-<exp>-<dtype>-stem-<the stem it resolved to>.*. Prints the
summary's headline numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

KINDS = (("convolution", re.compile(r"conv|cudnn|xmma_fprop|xmma_dgrad|xmma_wgrad|implicit_gemm"
                                    r"|winograd|fprop|dgrad|wgrad", re.I)),
         ("matmul", re.compile(r"gemm|cublas|cutlass|sm90_xmma|ampere_|hopper_|wgmma", re.I)),
         ("copy", re.compile(r"memcpy|memset|copy", re.I)),
         ("fusion", re.compile(r"fusion|reduce|loop_|input_|transpose|select|scatter", re.I)))


GAPS = 5  # the largest idle gaps listed in a summary


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(name)), "other")


def device_events(trace: dict) -> tuple[list[dict], dict]:
    """The trace's GPU activity (kernels, copies) and a census of every (process, thread) row.

    A GPU's rows are the threads named 'Stream ...' of a process whose name names a GPU; the
    other rows of that process ('XLA Ops', 'XLA Modules', 'Steps') repeat the same time spans
    at a coarser grain and are left out, or a step would be counted twice.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e.get("args", {}).get("name", "")
    census: dict[str, int] = {}
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        proc, thread = procs.get(e["pid"], "?"), threads.get((e["pid"], e.get("tid")), "?")
        census[f"{proc} | {thread}"] = census.get(f"{proc} | {thread}", 0) + 1
        if re.search(r"gpu", proc, re.I) and thread.lower().startswith("stream"):
            out.append(e)
    return out, census


def summarize(events: list[dict], steps: int) -> dict:
    """Kernel count, busy time, gaps and the top kernels of `events` (trace 'X' events, in us)."""
    if not events:
        return {"kernels": 0}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
                   for e in events)
    # Merge overlapping spans (several streams); a gap is where no kernel runs, named by the
    # kernel that ended last before it and the one that starts it.
    busy, gaps, (start, end, last) = 0.0, [], spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, end, last, name))
            start, end, last = s, e, name
        elif e > end:
            end, last = e, name
    busy += end - start
    wall = max(e for _, e, _ in spans) - spans[0][0]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e["name"], []).append(float(e.get("dur", 0)))
    by_kind: dict[str, list[float]] = {}
    for name, durs in by_name.items():
        by_kind.setdefault(kind(name), []).extend(durs)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]
    median_gap = statistics.median(g for g, *_ in gaps) if gaps else 0.0
    per_step = len(events) / steps
    return {
        "steps": steps, "kernels": len(events), "kernels_per_step": per_step,
        "device_wall_ms_per_step": wall / steps / 1e3,
        "kernel_busy_ms_per_step": busy / steps / 1e3,
        "busy_share": busy / wall if wall else None,
        "median_gap_us": median_gap, "idle_ms_per_step": (wall - busy) / steps / 1e3,
        "launch_floor_ms_per_step": per_step * median_gap / 1e3,
        # The idle spans a launch does not explain (a host round trip between two calls shows
        # here as one gap per call boundary, milliseconds long), largest first.
        "largest_gaps": [{"us": g, "at_ms": (t - spans[0][0]) / 1e3, "after": a[:100],
                          "before": b[:100]} for g, t, a, b in sorted(gaps, reverse=True)[:GAPS]],
        "by_kind": {k: {"count_per_step": len(d) / steps, "ms_per_step": sum(d) / steps / 1e3}
                    for k, d in sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))},
        "top_kernels": [{"name": n[:160], "kind": kind(n), "count_per_step": len(d) / steps,
                         "ms_per_step": sum(d) / steps / 1e3,
                         "mean_us": sum(d) / len(d)} for n, d in top],
    }


def main(argv: list[str] | None = None) -> int:
    from jaxbench import cli, perf

    p = argparse.ArgumentParser(prog="benchmarks/gpu_trace.py", description=__doc__.split("\n")[0])
    p.add_argument("--exp", required=True)
    p.add_argument("--arrays", required=True, help=".npz of `python -m jaxbench.data export`")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=perf.DTYPES)
    p.add_argument("--stem-conv", choices=perf.STEM_CONVS, help="default: the run's")
    p.add_argument("--calls", type=cli.positive_int, default=2, help="train calls to record")
    p.add_argument("--steps-per-call", type=cli.positive_int,
                   help="default: the run's (perf.steps_per_call)")
    args = p.parse_args(argv)

    import jax

    from jaxbench import config, data

    cli.enable_compile_cache()
    try:
        cfg = config.load(args.exp).replace(dtype=args.dtype, steps_per_call=args.steps_per_call,
                                            stem_conv=args.stem_conv)
        # The run's steps per call (only that is read: the XLA:CPU check is skipped here).
        k = perf.resolve(cfg.perf, jax.default_backend(), cfg.model, cfg.num_classes,
                         cfg.batch_size, cfg.image_size,
                         choose=lambda *_: ("default", None)).steps_per_call
        cfg = cfg.replace(train_limit=args.calls * k * cfg.batch_size,  # an epoch = --calls calls
                          eval_limit=cfg.batch_size)
        split = data.load_arrays(args.arrays, cfg)
    except (config.ConfigError, data.DataError) as err:
        return cli.fail(str(err))
    trainer = cli.make_trainer("jax", cfg, *split, "none", None)
    state = trainer.init_state()
    compile_s = trainer.compile(state)
    state, _, _ = trainer.train_epoch(state, 0)  # warm-up: autotuning, caches
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, _, _ = trainer.train_epoch(state, 1)
    jax.block_until_ready(state)
    untraced_s = time.perf_counter() - t0
    steps = args.calls * trainer.steps_per_call
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            state, _, _ = trainer.train_epoch(state, 2)
            jax.block_until_ready(state)
        found = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
        if not found:
            print(f"error: jax.profiler wrote no perfetto_trace.json.gz under {tmp}",
                  file=sys.stderr)
            return 1
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"trace-{args.exp}-{args.dtype}" + (
            f"-stem-{trainer.perf.stem_conv}" if args.stem_conv else "")
        shutil.copy(found[0], out / f"{stem}.json.gz")
    with gzip.open(out / f"{stem}.json.gz", "rt") as f:
        trace = json.load(f)
    events, census = device_events(trace)
    summary = {"exp": args.exp, "dtype": args.dtype, "stem_conv": trainer.perf.stem_conv,
               "device": str(jax.devices()[0].device_kind),
               "jax": jax.__version__, "steps_per_call": trainer.steps_per_call,
               "calls": args.calls, "compile_s": compile_s,
               "untraced_ms_per_step": untraced_s / steps * 1e3,
               **summarize(events, steps), "rows": census}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    keys = ("kernels_per_step", "untraced_ms_per_step", "device_wall_ms_per_step",
            "kernel_busy_ms_per_step", "busy_share", "median_gap_us", "launch_floor_ms_per_step")
    print(f"{stem}: " + ", ".join(f"{k} {summary[k]:.3g}" for k in keys if summary.get(k) is not None))
    for k_, v in summary.get("by_kind", {}).items():
        print(f"  {k_}: {v['count_per_step']:.1f} per step, {v['ms_per_step']:.3f} ms per step")
    for row in summary.get("top_kernels", [])[:12]:
        print(f"  {row['ms_per_step']:.3f} ms/step  x{row['count_per_step']:.0f}  {row['name'][:90]}")
    for gap in summary.get("largest_gaps", []):
        print(f"  idle {gap['us']:.0f} us at {gap['at_ms']:.2f} ms, after {gap['after'][:40]}, "
              f"before {gap['before'][:40]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
