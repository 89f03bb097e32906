"""JAX vs PyTorch on the same training job, same machine, one run.

    python -m jaxbench.bench --exp fmnist_baseline --exp fmnist_target --steps 100 --repeats 3

For every experiment the same arrays, the same batch order and the same preprocessing feed every
variant: JAX (jit), PyTorch eager, `torch.compile`, on CUDA `torch.compile(mode=
"reduce-overhead")`, and `torch-best` (jaxbench/torch_best.py: what a PyTorch expert would tune). Each variant is compiled and warmed up first (that time is reported apart),
then timed for R repeats, alternating the variants inside every repeat (in an order rotated from
one repeat to the next) so that drift on the machine (thermal, other load) hits them alike; the
median is reported. With `--steps N` a repeat is N train steps (reported per 1,000 images); with
`--epochs N` it is N full epochs (reported per epoch).

Writes `<out>/<machine-tag>.json` and `<out>/<machine-tag>.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from jaxbench import config as config_lib
from jaxbench import cli, outputs
from jaxbench.config import ConfigError


VARIANTS = {"jax": ("jax", "none"), "jax-xla-default": ("jax", "none"),
            "jax-step-only": ("jax", "none"), "jax-bf16": ("jax", "none"),
            "jax-stem-patches": ("jax", "none"),
            "jax-seeds3": ("jax", "none"), "jax-seeds3-vmap": ("jax", "none"),
            "torch-eager": ("torch", "none"),
            "torch-compile": ("torch", "default"), "torch-reduce-overhead": ("torch", "reduce-overhead"),
            "torch-best": ("torch", "best")}


GROUP = (0, 1, 2)  # the seeds of the jax-seeds3 variants
GROUPED = ("jax-seeds3", "jax-seeds3-vmap")


def variants(cuda: bool, only: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(label, framework, torch_compile) for every variant this machine can run.

    reduce-overhead (CUDA graphs) exists for CUDA only. jax-xla-default (the same JAX program
    compiled with XLA's default options, `perf.xla_cpu = "default"`: the before/after of the
    run's compile choice in one run) exists only where JAX runs on CPU. jax-step-only
    (`StepOnly`) measures the input side. jax-bf16 is the same experiment with `--dtype
    bfloat16` (skipped when the run is bfloat16 already). jax-stem-patches runs the first
    convolution as one matrix product over image patches (`--stem-conv patches`,
    `models.patch_conv`; not for DenseNet-BC, which has no such setting); it exists off CPU
    only (on XLA:CPU it made TargetCNN's step 9% slower: benchmarks/stem_ab.py). JAX always
    runs: ratios are against it. jax-seeds3 trains seeds 0, 1, 2 as one seed group (`--seeds`,
    the run's `perf.seed_group`), jax-seeds3-vmap the same group vmapped; their times are per
    seed (the group's time / 3), and `group_over_one` is the group's epoch over one seed's.
    """
    import jax

    cpu = jax.default_backend() == "cpu"
    labels = [k for k in VARIANTS if (cuda or k != "torch-reduce-overhead")
              and (cpu or k != "jax-xla-default") and (not cpu or k != "jax-stem-patches")]
    if only:
        labels = [k for k in labels if k in only or k == "jax"]
    return [(k, *VARIANTS[k]) for k in labels]


def machine(cuda: bool) -> dict:
    import jax

    info = {"cpu": outputs.cpu_name(), "cores": os.cpu_count(),
            "jax_device": f"{jax.devices()[0].platform} {jax.devices()[0].device_kind}"}
    if cuda:
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_tag(info: dict) -> str:
    name = info.get("gpu") or f"cpu-{info['cpu']}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def matmul_size() -> int:
    """The yardstick matmul's side: 2048 on CPU; 8192 on accelerators, which 2048 cannot fill."""
    import jax

    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_peak_gflops(n: int | None = None, repeats: int = 10, dtype: str = "float32") -> float:
    """n x n matmul throughput under JAX on this machine: the yardstick for model FLOP/s.

    float32 at JAX's default precision, which is what the models run (on NVIDIA GPUs since
    Ampere XLA runs it on TF32 tensor cores; on CPU it is float32); `matmul_size()` by default.
    The best over every XLA:CPU option set (`perf.XLA_CPU_OPTIONS`; one compile elsewhere): they
    pick different matmul kernels, and a yardstick below what the machine can do would flatter
    the model's share of it.
    """
    import jax
    import jax.numpy as jnp

    from jaxbench import perf

    n = n or matmul_size()
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    lowered = jax.jit(lambda x: x @ x).lower(a)
    options = perf.XLA_CPU_OPTIONS.values() if jax.default_backend() == "cpu" else [{}]
    best = 0.0
    for f in [perf.compile_lowered(lowered, o)[0] for o in options]:
        f(a).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = f(a)
        out.block_until_ready()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def step_gflop(trainer) -> float:
    """GFLOP of one JAX train step: its convolutions and matrix products, read off the traced
    program (`train.step_flops`), the same count on every backend."""
    from jaxbench import train

    return train.step_flops(trainer.cfg) / 1e9


def versions() -> dict:
    import flax
    import jax
    import optax
    import torch

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "torch": torch.__version__}


class StepOnly:
    """The JAX train step alone, repeated on one preprocessed batch that stays on the device.

    The same number of steps as a `Trainer` epoch, in calls of the trainer's steps per call (a
    scan over the step, as the trainer's, the epoch's tail its own call), without the per-step
    gather, resize and normalization, the index transfer and the host loop's bookkeeping: an
    epoch with a free input side. 1 - (its time / the jax variant's) is the input side's share
    of epoch time.
    """

    def __init__(self, trainer):
        self.trainer, self.steps_per_epoch = trainer, trainer.steps_per_epoch

    @property
    def perf(self):
        return self.trainer.perf  # the wrapped run's resolved settings, as compiled

    def init_state(self):
        return self.trainer.init_state()

    def compile(self, state) -> float:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxbench import data, perf, train

        t0 = time.perf_counter()
        t, b = self.trainer, self.trainer.cfg.batch_size
        images, labels = t.images["train"]
        batch = NamedSharding(t.mesh, PartitionSpec("data"))
        self.x = jax.device_put(data.preprocess(images[:b], t.mean, t.std, t.cfg.image_size), batch)
        self.y = jax.device_put(labels[:b], batch)
        self.calls = train.call_lengths(self.steps_per_epoch, t.steps_per_call)
        self.fns = {}
        for n in sorted(set(self.calls)):
            def steps(state, x, y, n=n):
                if n == 1:
                    return train.train_step(state, x, y)[0]
                return jax.lax.scan(lambda s, _: (train.train_step(s, x, y)[0], None), state,
                                    length=n)[0]

            lowered = jax.jit(steps, donate_argnums=0).lower(state, self.x, self.y)
            self.fns[n], _ = perf.compile_lowered(lowered, t.perf.compiler_options)
        return time.perf_counter() - t0

    def train_epoch(self, state, epoch: int):
        import jax

        for n in self.calls:
            state = self.fns[n](state, self.x, self.y)
        return jax.block_until_ready(state), None, self.steps_per_epoch


def bench_experiment(cfg, train, test, repeats: int, epochs_per_repeat: int, cuda: bool,
                     only: Sequence[str] | None = None, log=print) -> dict:
    trainers, states, warm, failed = {}, {}, {}, {}
    for label, framework, mode in variants(cuda, only):
        if ((label == "jax-bf16" and cfg.perf.dtype == "bfloat16")
                or (label == "jax-stem-patches"
                    and (cfg.perf.stem_conv == "patches" or cfg.model == "densenet"))):
            continue  # the run is that already (or has no stem setting): `jax` is this variant
        variant_cfg = (cfg.replace(xla_cpu="default") if label == "jax-xla-default" else
                       cfg.replace(seed_group="vmap") if label == "jax-seeds3-vmap" else
                       cfg.replace(dtype="bfloat16") if label == "jax-bf16" else
                       cfg.replace(stem_conv="patches") if label == "jax-stem-patches" else cfg)
        seeds = GROUP if label in GROUPED else None
        t0 = time.perf_counter()
        try:
            trainer = cli.make_trainer(framework, variant_cfg, train, test, mode, seeds)
            if label == "jax-step-only":
                trainer = StepOnly(trainer)
            state = trainer.init_state()
            t0 = time.perf_counter()
            compile_s = trainer.compile(state)
            state, _, _ = trainer.train_epoch(state, 0)  # warm-up: caches, autotuning, compiles
        except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others
            if label == "jax":
                raise
            failed[label] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log(f"  {label}: FAILED after {time.perf_counter() - t0:.1f}s ({failed[label]})")
            continue
        warm[label] = {"compile_s": compile_s, "warmup_s": time.perf_counter() - t0}
        if framework == "torch":  # how it ran: compile mode, and for torch-best its CUDA graph
            warm[label]["settings"] = trainer.record()
        else:  # the resolved speed settings (dtype, stem conv, compile, steps per call)
            warm[label]["perf"] = trainer.perf.to_dict()
        trainers[label], states[label] = trainer, state
        log(f"  {label}: warm-up {warm[label]['warmup_s']:.1f}s (compile {compile_s:.1f}s)")
    times = {label: [] for label in trainers}
    labels = list(trainers)
    for r in range(repeats):
        # Rotate the order every repeat, so no variant always runs right after the same other
        # one and whatever that one leaves behind (threads, caches) cannot bias it alone.
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            trainer = trainers[label]
            t0 = time.perf_counter()
            for e in range(epochs_per_repeat):
                states[label], _, _ = trainer.train_epoch(states[label], 1 + r * epochs_per_repeat + e)
            times[label].append((time.perf_counter() - t0) / epochs_per_repeat)
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    images = next(iter(trainers.values())).steps_per_epoch * cfg.batch_size
    rows = {}
    for label, ts in times.items():
        median = statistics.median(ts) / (len(GROUP) if label in GROUPED else 1)
        rows[label] = {**warm[label], "times_s": ts, "median_s": median,
                       "per_1000_images_s": median / images * 1000, "images_per_s": images / median}
    for label in set(GROUPED) & set(rows):
        rows[label]["group_over_one"] = len(GROUP) * rows[label]["median_s"] / rows["jax"]["median_s"]
        rows[label]["seed_group"] = trainers[label].perf.seed_group
    for label, row in rows.items():
        row["jax_over_this"] = rows["jax"]["median_s"] / row["median_s"]
    gflop, steps = step_gflop(trainers["jax"]), images / cfg.batch_size
    for label, row in rows.items():
        if label.startswith("jax") and label not in GROUPED:
            row["gflops"] = gflop * steps / row["median_s"]
    out = {"images_per_repeat": images, "variants": rows,
           "jax_perf": trainers["jax"].perf.to_dict(), "jax_gflop_per_step": gflop,
           "jax_gflops": rows["jax"]["gflops"]}
    if failed:
        out["failed"] = failed
    if "jax-step-only" in rows:
        out["input_share"] = 1 - rows["jax-step-only"]["median_s"] / rows["jax"]["median_s"]
    return out


def markdown(result: dict) -> str:
    unit = result["unit"]
    lines = [f"# Training speed: {result['machine'].get('gpu') or result['machine']['cpu']}",
             "", f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores"
             + (f", GPU {result['machine']['gpu']}" if result['machine'].get('gpu') else "")
             + f"; JAX device: {result['machine']['jax_device']}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             f"Median of {result['repeats']} repeats, variants alternated within each repeat "
             "(order rotated from one repeat to the next); "
             f"time {unit}. `JAX / this` is JAX's time over this variant's: above 1 JAX is slower, "
             f"below 1 faster. `jax-xla-default` is the same JAX program compiled with XLA's "
             f"default options (`jax` uses the run's `perf.xla_cpu` choice, listed below the table). "
             f"JAX model FLOP/s is the train step's convolution and matmul FLOPs (read off the "
             f"traced program) over its time, against a float32 "
             f"{result.get('matmul_n', 2048)}-square matmul under JAX (default precision) in the "
             f"same run (on CPU the fastest over XLA:CPU's option sets): "
             f"{result['matmul_peak_gflops']:.0f} GFLOP/s.", "",
             f"| experiment | variant | {unit} (s) | images/s | JAX / this | warm-up (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for exp, res in result["experiments"].items():
        for label, row in res["variants"].items():
            value = row["median_s"] if unit == "per epoch" else row["per_1000_images_s"]
            lines.append(f"| {exp} | {label} | {value:.3f} | {row['images_per_s']:.0f} | "
                         f"{row['jax_over_this']:.2f} | {row['warmup_s']:.1f} |")
    lines += [f"\n{exp} `{label}` failed in its warm-up: {why}" for exp, res in
              result["experiments"].items() for label, why in res.get("failed", {}).items()]
    lines += ["", "JAX compile per experiment: " + "; ".join(
        f"{exp} `{res['jax_perf']['xla_cpu']}`" for exp, res in result["experiments"].items()
        if "jax_perf" in res) + "."]
    groups = [(exp, label, row) for exp, res in result["experiments"].items()
              for label, row in res["variants"].items() if "group_over_one" in row]
    if groups:
        lines += ["", "Seed groups (seeds 0, 1, 2 together, `perf.seed_group` in brackets; their "
                  "rows are per seed): the group's epoch over one seed's (3.00x = as slow as "
                  "the seeds one after another): "
                  + "; ".join(f"{exp} `{label}` ({row.get('seed_group', 'vmap')}) "
                              f"{row['group_over_one']:.2f}x" for exp, label, row in groups) + "."]
    flops = [(exp, res) for exp, res in result["experiments"].items() if "jax_gflops" in res]
    if flops:
        peak, bf16_peak = result["matmul_peak_gflops"], result.get("matmul_peak_bf16_gflops")
        lines += ["", "Model FLOP/s: the JAX variants' GFLOP per step (convolutions and matmuls "
                  "of the traced train step, padding taps included; the same for every variant) "
                  "times steps over "
                  "their time; `jax` counts the whole epoch, `jax-step-only` the train step alone "
                  "on a device-resident batch. % of peak is against the float32 matmul above"
                  + (f" ({bf16_peak:.0f} GFLOP/s in bfloat16 for `jax-bf16`)" if bf16_peak
                     else "") + ". Input side: 1 - step-only time / jax time.", "",
                  "| experiment | GFLOP per step | variant | GFLOP/s | % of peak | input side |",
                  "|---|---:|---|---:|---:|---:|"]
        for exp, res in flops:
            for label, row in res["variants"].items():
                if "gflops" not in row and label != "jax":
                    continue
                gflops = row.get("gflops", res["jax_gflops"])
                ref = bf16_peak if label == "jax-bf16" and bf16_peak else peak
                share = (f"{100 * res['input_share']:.1f}%" if label == "jax"
                         and "input_share" in res else "")
                lines.append(f"| {exp} | {res['jax_gflop_per_step']:.1f} | {label} | "
                             f"{gflops:.0f} | {100 * gflops / ref:.0f}% | {share} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.bench", description=__doc__.split("\n")[0])
    p.add_argument("--exp", action="append", required=True, help="experiment (repeatable)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=cli.positive_int, help="time N train steps per repeat")
    group.add_argument("--epochs", type=cli.positive_int, help="time N full epochs per repeat")
    p.add_argument("--repeats", type=cli.positive_int, default=3)
    p.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)} "
                   "(default: all this machine runs; jax always runs)")
    p.add_argument("--out", default="results/speed", help="folder for <machine-tag>.json/.md")
    cli.add_data_args(p)
    args = p.parse_args(argv)
    steps = args.steps if args.steps or args.epochs else 50
    unknown = set(args.variants.split(",")) - set(VARIANTS) if args.variants else set()
    if unknown:
        return cli.fail(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}.")
    try:  # the flags first: a typo should not wait for PyTorch and the matmul yardstick
        cfgs = {name: config_lib.load(name) for name in args.exp}
        out = outputs.ensure_dir(Path(args.out), "--out")
    except ConfigError as err:
        return cli.fail(str(err))
    try:
        import torch
    except ImportError:
        return cli.fail("the benchmark needs PyTorch: pip install -e '.[torch]'.")
    from jaxbench import data

    cli.enable_compile_cache()
    cuda = torch.cuda.is_available()
    info = machine(cuda)
    result = {"command": "python -m jaxbench.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": info, "versions": versions(), "repeats": args.repeats,
              "matmul_peak_gflops": matmul_peak_gflops(),
              "matmul_n": matmul_size(),
              "unit": "per epoch" if args.epochs else "per 1,000 images", "experiments": {}}
    import jax

    if jax.default_backend() != "cpu":  # the matrix units' bfloat16 rate, for `jax-bf16`
        result["matmul_peak_bf16_gflops"] = matmul_peak_gflops(dtype="bfloat16")
    tag = machine_tag(info)
    if args.variants:
        here = {label for label, _, _ in variants(cuda)}
        for label in [k for k in args.variants.split(",") if k not in here]:
            print(f"[bench] {label}: not run on this machine (see `bench.variants`)", flush=True)
    try:
        for name, cfg in cfgs.items():
            cfg = cfg.replace(
                batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
                steps_per_call=args.steps_per_call, stem_conv=args.stem_conv,
                xla_cpu=args.xla_cpu, seed_group=args.seed_group)
            limit = args.train_limit or (steps * cfg.batch_size if steps else None)
            cfg = cfg.replace(train_limit=limit, eval_limit=args.eval_limit or cfg.batch_size)
            train, test = data.load(cfg, args.data_dir, args.manual_dir, args.arrays)
            print(f"[bench] {name}: {len(train) // cfg.batch_size} steps per repeat", flush=True)
            result["experiments"][name] = bench_experiment(
                cfg, train, test, args.repeats, args.epochs or 1, cuda,
                args.variants.split(",") if args.variants else None)
            # After every experiment: a run stopped later (a time limit) keeps what it measured.
            outputs.write_json(out / f"{tag}.json", result)
            outputs.write_atomic(out / f"{tag}.md", markdown(result))
    except (ConfigError, data.DataError) as err:
        return cli.fail(str(err))
    except outputs.OutputError as err:  # a full disk, a permission taken away
        print(f"error: {err}; what was measured before is in {out}.", file=sys.stderr)
        return outputs.EXIT_OUTPUT_FAILED
    print(markdown(result))
    print(f"wrote {out / tag}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
