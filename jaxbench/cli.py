"""Command-line plumbing shared by the front doors (run, bench, data export).

Argument types, the data flags, the experiment + override resolution, the trainer factory and the
one-line error exit live here, so library modules (data, train, loop, ...) never import a CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from jaxbench import config as config_lib
from jaxbench import perf
from jaxbench.config import ConfigError

EXIT_USAGE = 2


def int_at_least(low: int):
    """An argparse type: an integer >= low, with a message that says so."""
    want = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def seed_list(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` (a list) or `--seeds 3` (shorthand for 0,1,2). A lone number is a count,
    so `--seeds 1` means seed 0; seed 1 alone is `--seeds 1,` (a list of one)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2 or a count like 3, got {text!r}") from None
    if "," not in text and len(values) == 1:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"expected a positive seed count, got {values[0]}")
        values = list(range(values[0]))
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return tuple(values)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads an experiment's data (run, bench)."""
    parser.add_argument("--data-dir", help="tfds data_dir (default: tfds' own, ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder with the official dataset files, for offline "
                        "preparation (tfds manual_dir)")
    parser.add_argument("--arrays", help="read the splits from an .npz written by "
                        "`python -m jaxbench.data export` instead of tfds (machines without TF)")
    parser.add_argument("--train-limit", type=positive_int, help="use only the first N train examples")
    parser.add_argument("--eval-limit", type=positive_int, help="use only the first N eval examples")
    parser.add_argument("--batch-size", type=positive_int, help="override the experiment's batch size")
    parser.add_argument("--seed", type=non_negative_int, help="override the experiment's seed")
    add_perf_args(parser)


def add_perf_args(parser: argparse.ArgumentParser) -> None:
    """Overrides of the experiment's [perf] table (jaxbench/perf.py); each is recorded."""
    g = parser.add_argument_group("speed choices (override the experiment's [perf] table)")
    g.add_argument("--dtype", choices=perf.DTYPES,
                   help="compute dtype (default float32). bfloat16 runs convolutions and matmuls "
                   "in bfloat16 (JAX: flax dtype; PyTorch: autocast) with float32 parameters, "
                   "optimizer state, BatchNorm statistics and loss")
    g.add_argument("--steps-per-call", type=positive_int,
                   help="train steps fused into one jitted call (default auto: 1 on CPU, 50 else)")
    g.add_argument("--stem-conv", choices=perf.STEM_CONVS,
                   help="the first convolution (BaselineCNN, TargetCNN): XLA's, a tap sum, or "
                   "one matrix product over image patches (auto: taps for BaselineCNN on CPU, "
                   "else XLA's)")
    g.add_argument("--xla-cpu", choices=perf.XLA_CPU,
                   help="XLA:CPU compile options (auto: ynn-reduce where it agrees with XLA's "
                   "default compile in a float32 self-check)")
    g.add_argument("--seed-group", choices=perf.SEED_GROUPS,
                   help="how --seeds runs its seeds: vmap (one program, batched kernels), "
                   "unroll (one program, each seed's own step in turn) or loop (the one-seed "
                   "program called per seed); auto: loop on CPU, vmap elsewhere")


def resolve(args: argparse.Namespace) -> config_lib.Config:
    cfg = config_lib.load(args.exp)
    return cfg.replace(epochs=getattr(args, "epochs", None), batch_size=args.batch_size,
                       seed=args.seed, train_limit=args.train_limit, eval_limit=args.eval_limit,
                       dtype=args.dtype, steps_per_call=args.steps_per_call,
                       stem_conv=args.stem_conv, xla_cpu=args.xla_cpu,
                       seed_group=args.seed_group)


def enable_compile_cache() -> str | None:
    """JAX's persistent compilation cache: a rerun skips XLA compilation of the same steps.

    On by default under ~/.cache/jaxbench/xla; JAXBENCH_COMPILE_CACHE=DIR moves it, an empty
    value turns it off. summary.json records which, since a cache hit shrinks compile_time_s.
    """
    path = os.environ.get("JAXBENCH_COMPILE_CACHE",
                          str(Path.home() / ".cache" / "jaxbench" / "xla"))
    if not path:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def keep_jax_off_the_gpu() -> None:
    """For a PyTorch run, before anything asks JAX for a backend.

    JAX still starts in one (the twin's schedule table, the run's record), for CPU work only;
    left alone it would open the GPU as well and take 75% of its memory before PyTorch asks for
    any. JAX_PLATFORMS set by the user is kept; then at least no preallocation.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not os.environ.get("JAX_PLATFORMS"):
        import jax

        jax.config.update("jax_platforms", "cpu")


TORCH_COMPILE = ("none", "default", "reduce-overhead", "best")


def make_trainer(framework: str, cfg: config_lib.Config, train, test,
                 torch_compile: str = "none", seeds: Sequence[int] | None = None):
    """The JAX Trainer (one seed, or a seed group) or its PyTorch twin (one seed): eager, under
    torch.compile, or tuned as an expert would (`best`, jaxbench/torch_best.py)."""
    if framework == "jax":
        from jaxbench.trainer import Trainer

        return Trainer(cfg, train, test, seeds=seeds)
    try:
        from jaxbench import torch_twin
    except ImportError:
        raise ConfigError("--framework torch needs PyTorch: pip install -e '.[torch]' "
                          "(on a CPU-only machine: pip install torch==2.13.0 first).") from None
    if torch_compile == "best":
        from jaxbench.torch_best import BestTrainer

        return BestTrainer(cfg, train, test)
    mode = None if torch_compile == "none" else torch_compile
    return torch_twin.Trainer(cfg, train, test, compile_mode=mode)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def export_main(argv=None) -> int:
    """`python -m jaxbench.data export --exp NAME --out FILE.npz`: the prepared splits as numpy."""
    from jaxbench import data

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m jaxbench.data")
    p.add_argument("command", choices=["export"])
    p.add_argument("--exp", required=True)
    p.add_argument("--out", required=True, help="the .npz file to write")
    add_data_args(p)
    args = p.parse_args(argv)
    from jaxbench import outputs

    out = Path(args.out)
    out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")  # as numpy names it
    try:
        cfg = resolve(args)
        outputs.ensure_dir(out.parent, "--out")  # before the data: preparing it can take minutes
        train, test = data.load(cfg, args.data_dir, args.manual_dir)
    except (ConfigError, data.DataError) as err:
        return fail(str(err))
    try:
        data.save_arrays(out, cfg.dataset, train, test)
    except OSError as err:  # a full disk, a permission taken away
        print(f"error: {outputs.OutputError(out, err)}", file=sys.stderr)
        return outputs.EXIT_OUTPUT_FAILED
    print(f"wrote {out}: {len(train):,} train and {len(test):,} {cfg.eval_split} images "
          f"of {cfg.dataset}")
    return 0


