"""The front door: `python -m jaxbench.run --exp tiny_target`.

Loads an experiment, its data, trains it epoch by epoch with a progress bar, and writes
`<out>/<exp>/metrics.jsonl` (one line per epoch) and `<out>/<exp>/summary.json`.
User mistakes end in one clear paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Sequence

from jaxbench import config as config_lib
from jaxbench.cli import (TORCH_COMPILE, add_data_args, enable_compile_cache, fail,
                          keep_jax_off_the_gpu, make_trainer, non_negative_int, positive_int,
                          resolve, seed_list)
from jaxbench.config import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.run", description=__doc__.split("\n")[0])
    p.add_argument("--exp", help="experiment name (see --list) or path to a .toml file")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--epochs", type=positive_int, help="override the experiment's epoch count")
    p.add_argument("--framework", choices=("jax", "torch"), default="jax",
                   help="train the Flax models (default) or their PyTorch twin on the same job")
    p.add_argument("--torch-compile", choices=TORCH_COMPILE, default="none",
                   help="with --framework torch: run the model eagerly, under torch.compile, or "
                   "best: channels_last, fused optimizer, compiled step, TF32/cudnn.benchmark on "
                   "CUDA (jaxbench/torch_best.py)")
    add_data_args(p)
    p.add_argument("--seeds", type=seed_list,
                   help="train several seeds: 0,1,2 (or 3 for 0,1,2). JAX trains them as one seed "
                   "group (--seed-group: vmapped on accelerators, looped on CPU); the PyTorch "
                   "twin one after another. Output: one folder per seed plus a summary.json "
                   "with mean and std")
    p.add_argument("--out", default="results/runs", help="output folder (default: results/runs)")
    p.add_argument("--run-dir", help="write this run into exactly this folder instead of "
                   "<out>/<exp> (the reproduce suite puts one seed's run into <exp>/seed<S>)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (see README)")
    p.add_argument("--coordinator", help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=positive_int, help="with --distributed")
    p.add_argument("--process-id", type=non_negative_int, help="with --distributed")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: <out>/<exp>/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--restart", action="store_true",
                   help="discard existing checkpoints of this experiment and start over")
    return p


def list_experiments() -> str:
    lines = []
    for name in config_lib.available():
        try:
            lines.append(f"{name:18s} {config_lib.load(name).description}")
        except ConfigError as err:
            lines.append(f"{name:18s} (invalid: {err})")
    return "\n".join(lines) or f"no experiments in {config_lib.experiments_dir()}"


def run_name(exp: str, framework: str, torch_compile: str = "none") -> str:
    """`<exp>` for JAX; `<exp>_torch` (or `_torch-compile`, ...) for the twin, so none overwrites."""
    if framework == "jax":
        return exp
    return f"{exp}_torch" + ("" if torch_compile == "none" else f"-{torch_compile}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.framework == "torch":
        keep_jax_off_the_gpu()
    if args.list:
        print(list_experiments())
        return 0
    if not args.exp:
        return fail("--exp NAME is required (or --list to see the experiments).")
    if args.resume and args.restart:
        return fail("--resume and --restart contradict each other; pass one.")
    if args.seeds is not None and args.seed is not None:
        return fail("--seed and --seeds contradict each other; pass one (--seeds 0,1,2).")
    if args.distributed:
        from jaxbench import distributed

        if (args.process_id is not None and args.num_processes is not None
                and args.process_id >= args.num_processes):
            return fail(f"--process-id {args.process_id} is not below --num-processes "
                        f"{args.num_processes}; processes are numbered from 0.")
        # Without arguments JAX detects the cluster (SLURM, Kubernetes, TPU pods) by itself.
        try:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except (RuntimeError, ValueError) as err:  # no coordinator, a cluster not detected, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
            return fail(f"--distributed: jax.distributed.initialize failed ({first}). Pass "
                        "--coordinator HOST:PORT --num-processes N --process-id I, or start the "
                        "processes on one machine with python -m jaxbench.launch --nproc N -- ...")
    cache = enable_compile_cache()
    from jaxbench import data, distributed, loop, outputs

    try:
        cfg = resolve(args)
        if args.seeds is not None:
            cfg = cfg.replace(seed=args.seeds[0])  # the group's config names its first seed
        # The output folders before the data, which can take minutes; created later.
        run_dir = Path(args.out) / run_name(cfg.name, args.framework, args.torch_compile)
        outputs.check_dir(*((args.run_dir, "--run-dir") if args.run_dir else (run_dir, "--out")))
        if args.checkpoint_dir:
            outputs.check_dir(args.checkpoint_dir, "--checkpoint-dir")
        # Several processes: process 0 prepares the data first (a tfds folder they may share).
        train, test = distributed.process0_first(
            lambda: data.load(cfg, args.data_dir, args.manual_dir, args.arrays), "loading the data")
        out = outputs.ensure_dir(Path(args.run_dir), "--run-dir") if args.run_dir else run_dir
        fit = functools.partial(loop.fit, framework=args.framework,
                                checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                                restart=args.restart, resume_hint=resume_command(argv),
                                extra={"compile_cache": bool(cache), **(
                                    {"parallel": distributed.record(cfg.batch_size)}
                                    if args.framework == "jax" else {})})
        if args.framework == "torch" and args.seeds is not None:
            for seed in args.seeds:  # no vmap for the twin: one seed after another
                seed_cfg = cfg.replace(seed=seed)
                fit(seed_cfg, make_trainer("torch", seed_cfg, train, test, args.torch_compile),
                    out / f"seed{seed}", extra={"compile_cache": bool(cache), "sequential": True})
            outputs.write_group_summary(out, args.seeds)
        else:
            trainer = make_trainer(args.framework, cfg, train, test, args.torch_compile, args.seeds)
            del train, test  # the trainer holds what it needs; let the host copy go
            fit(cfg, trainer, out)
    except (ConfigError, data.DataError, distributed.ProcessZeroFailed) as err:
        return fail(str(err))
    except loop.Interrupted as err:
        print(str(err), file=sys.stderr)
        return loop.EXIT_INTERRUPTED
    except loop.Diverged as err:
        print(f"error: {err}; stopped. The last good checkpoint is intact; lower the learning "
              "rate or check the data before resuming.", file=sys.stderr)
        return loop.EXIT_DIVERGED
    except outputs.OutputError as err:  # mid-run: a full disk, a permission taken away, EIO
        print(f"error: {err}. The files written before are whole (metrics.jsonl and "
              "summary.json as of the last finished epoch, the committed checkpoints); free "
              f"space or fix the permissions, then resume with: {resume_command(argv)}",
              file=sys.stderr)
        return outputs.EXIT_OUTPUT_FAILED
    return 0


def resume_command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a not in ("--resume", "--restart")]
    return " ".join(["python -m jaxbench.run", *args, "--resume"])


if __name__ == "__main__":
    sys.exit(main())
