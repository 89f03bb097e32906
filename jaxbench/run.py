"""The front door: `python -m jaxbench.run --exp tiny_target`.

Loads an experiment, its data, trains it epoch by epoch with a progress bar, and writes
`<out>/<exp>/metrics.jsonl` (one line per epoch) and `<out>/<exp>/summary.json`.
User mistakes end in one clear paragraph on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from jaxbench import config as config_lib
from jaxbench.config import ConfigError

EXIT_USAGE = 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads an experiment's data (run, bench)."""
    parser.add_argument("--data-dir", help="tfds data_dir (default: tfds' own, ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder with the official dataset files, for offline "
                        "preparation (tfds manual_dir)")
    parser.add_argument("--train-limit", type=positive_int, help="use only the first N train examples")
    parser.add_argument("--eval-limit", type=positive_int, help="use only the first N eval examples")
    parser.add_argument("--batch-size", type=positive_int, help="override the experiment's batch size")
    parser.add_argument("--seed", type=non_negative_int, help="override the experiment's seed")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxbench.run", description=__doc__.split("\n")[0])
    p.add_argument("--exp", help="experiment name (see --list) or path to a .toml file")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--epochs", type=positive_int, help="override the experiment's epoch count")
    p.add_argument("--framework", choices=("jax", "torch"), default="jax",
                   help="train the Flax models (default) or their PyTorch twin on the same job")
    p.add_argument("--torch-compile", choices=("none", "default", "reduce-overhead"), default="none",
                   help="with --framework torch: run the model eagerly or under torch.compile")
    add_data_args(p)
    p.add_argument("--out", default="results/runs", help="output folder (default: results/runs)")
    p.add_argument("--steps-per-call", type=positive_int,
                   help="train steps fused into one jitted call (default: 1 on CPU, 50 on GPU)")
    return p


def list_experiments() -> str:
    lines = []
    for name in config_lib.available():
        try:
            lines.append(f"{name:18s} {config_lib.load(name).description}")
        except ConfigError as err:
            lines.append(f"{name:18s} (invalid: {err})")
    return "\n".join(lines) or f"no experiments in {config_lib.experiments_dir()}"


def resolve(args: argparse.Namespace) -> config_lib.Config:
    cfg = config_lib.load(args.exp)
    return cfg.replace(epochs=getattr(args, "epochs", None), batch_size=args.batch_size,
                       seed=args.seed, train_limit=args.train_limit, eval_limit=args.eval_limit)


def write_json(path: Path, obj: Any) -> None:
    """Write to a temporary name, then rename: a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(framework: str = "jax") -> dict[str, Any]:
    """Where and with what a run happened, for summary.json."""
    import flax
    import jax
    import numpy
    import optax

    dev = jax.devices()[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                "flax": flax.__version__, "optax": optax.__version__, "numpy": numpy.__version__}
    try:
        import tensorflow_datasets as tfds
        versions["tfds"] = tfds.__version__
    except ImportError:
        versions["tfds"] = None
    if framework == "torch":
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            return {"device": {"platform": "gpu", "name": torch.cuda.get_device_name(),
                               "count": torch.cuda.device_count(), "cpu": cpu_name(),
                               "cores": os.cpu_count()}, "versions": versions}
        return {"device": {"platform": "cpu", "name": "cpu", "count": 1, "cpu": cpu_name(),
                           "cores": os.cpu_count(), "threads": torch.get_num_threads()},
                "versions": versions}
    return {"device": {"platform": dev.platform, "name": dev.device_kind,
                       "count": jax.device_count(), "cpu": cpu_name(), "cores": os.cpu_count()},
            "versions": versions}


def fit(cfg: config_lib.Config, trainer, out_dir: Path, framework: str = "jax") -> dict:
    """Train every epoch, evaluate after each, and keep metrics.jsonl / summary.json current."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    state = trainer.init_state()
    compile_s = trainer.compile(state)
    print(f"[{cfg.name}] {framework}: {trainer.param_count(state):,} params, "
          f"{len(trainer.train):,} train / {len(trainer.test):,} eval images, "
          f"{trainer.steps_per_epoch} steps/epoch, compiled in {compile_s:.1f}s", flush=True)
    summary = {"experiment": cfg.name, "framework": framework,
               "params": trainer.param_count(state), "compile_time_s": compile_s,
               **environment(framework), "normalization": {"mean": trainer.mean.tolist(),
                                                  "std": trainer.std.tolist()},
               "config": cfg.to_dict(), "train_examples": len(trainer.train),
               "eval_examples": len(trainer.test), "epochs_completed": 0}
    history = []
    images = trainer.steps_per_epoch * cfg.batch_size
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        with tqdm(total=images, desc=f"epoch {epoch}/{cfg.epochs}", unit="img", leave=False,
                  file=sys.stderr, disable=None) as bar:
            state, tr = trainer.train_epoch(state, epoch, bar.update)
        train_s = time.perf_counter() - t0
        ev = trainer.evaluate(state)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
               "test_loss": ev["loss"], "test_acc": ev["acc"], "epoch_time_s": train_s,
               "eval_time_s": time.perf_counter() - t0 - train_s,
               "images_per_s": images / train_s, "lr": trainer.lr(state)}
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{cfg.name}] epoch {epoch}/{cfg.epochs}  train loss {tr['loss']:.4f} "
              f"acc {tr['acc']:.4f} | {cfg.eval_split} loss {ev['loss']:.4f} acc {ev['acc']:.4f} "
              f"| {train_s:.1f}s ({row['images_per_s']:.0f} img/s) lr {row['lr']:.3g}", flush=True)
        steady = history[1:] or history
        best = max(history, key=lambda r: r["test_acc"])
        summary.update({"epochs_completed": epoch, "final_test_acc": ev["acc"],
                        "final_test_loss": ev["loss"], "best_test_acc": best["test_acc"],
                        "best_epoch": best["epoch"],
                        "mean_epoch_time_s": sum(r["epoch_time_s"] for r in steady) / len(steady),
                        "first_epoch_time_s": history[0]["epoch_time_s"]})
        write_json(out_dir / "summary.json", summary)
    print(f"[{cfg.name}] done: {cfg.eval_split} acc {summary['final_test_acc']:.4f} "
          f"(best {summary['best_test_acc']:.4f} at epoch {summary['best_epoch']}); "
          f"wrote {out_dir}/metrics.jsonl and summary.json", flush=True)
    return summary


def run_name(exp: str, framework: str, torch_compile: str = "none") -> str:
    """`<exp>` for JAX; `<exp>_torch` (or `_torch-compile`, ...) for the twin, so none overwrites."""
    if framework == "jax":
        return exp
    return f"{exp}_torch" + ("" if torch_compile == "none" else f"-{torch_compile}")


def make_trainer(framework: str, cfg: config_lib.Config, train, test, steps_per_call=None,
                 torch_compile: str = "none"):
    """The JAX Trainer or its PyTorch twin; both serve `fit` and the benchmark alike."""
    if framework == "jax":
        from jaxbench.train import Trainer

        return Trainer(cfg, train, test, steps_per_call=steps_per_call)
    try:
        from jaxbench import torch_twin
    except ImportError:
        raise ConfigError("--framework torch needs PyTorch: pip install -e '.[torch]' "
                          "(on a CPU-only machine: pip install torch==2.13.0 first).") from None
    mode = None if torch_compile == "none" else torch_compile
    return torch_twin.Trainer(cfg, train, test, compile_mode=mode)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print(list_experiments())
        return 0
    if not args.exp:
        return fail("--exp NAME is required (or --list to see the experiments).")
    from jaxbench import data

    try:
        cfg = resolve(args)
        train, test = data.load(cfg, args.data_dir, args.manual_dir)
        trainer = make_trainer(args.framework, cfg, train, test, steps_per_call=args.steps_per_call,
                               torch_compile=args.torch_compile)
        del train, test  # the trainer holds what it needs; let the host copy go
        fit(cfg, trainer, Path(args.out) / run_name(cfg.name, args.framework, args.torch_compile),
            framework=args.framework)
    except (ConfigError, data.DataError) as err:
        return fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
