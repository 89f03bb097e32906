"""A model's first layer: XLA's convolution vs `models.tap_conv` vs `models.patch_conv`.

    python benchmarks/stem_ab.py --repeats 9
    python benchmarks/stem_ab.py --exp tiny_target --stems xla,patches --repeats 5 --calls 3

Times, at batch 32, the forward+backward pass alone and the whole jitted train step
(`train.train_step`: loss, gradients, optimizer update), compiled with `--xla-cpu` options
(`perf.compile_lowered`; ignored off CPU), once per `perf.stem_conv` setting in `--stems`:
"xla" (XLA's convolution), "taps" (`models.tap_conv`), "patches" (`models.patch_conv`). Variants
alternate within every repeat; medians in ms are printed as a Markdown table. This is the
measurement behind `perf.stem_conv = "auto"` choosing taps for BaselineCNN on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxbench import config, models, perf, train

STEMS = ("xla", "taps", "patches")


def compiled(cfg: config.Config, stem: str, options: dict, x: jax.Array, y: jax.Array) -> dict:
    """Zero-argument callables running the fwd+bwd and the train step with stem conv `stem`."""
    model = models.build(cfg.model, cfg.num_classes, cfg.dtype, stem_conv=stem)
    state = train.create_state(cfg, 1000, model)

    def loss(params):
        return train.loss_and_logits(state, params, x, y, train=True)[0]

    grad, _ = perf.compile_lowered(jax.jit(jax.value_and_grad(loss)).lower(state.params), options)
    step, _ = perf.compile_lowered(
        jax.jit(train.train_step, donate_argnums=0).lower(state, x, y), options)
    params = jax.tree.map(jnp.copy, state.params)  # the step donates (deletes) state's buffers
    holder = [state]

    def one_step():
        holder[0], metrics = step(holder[0], x, y)
        return metrics

    return {"fwd+bwd": lambda: grad(params), "train step": one_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--exp", default="tiny_baseline")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--calls", type=int, default=30, help="calls per timing")
    p.add_argument("--xla-cpu", choices=list(perf.XLA_CPU_OPTIONS), default="ynn-reduce")
    p.add_argument("--stems", default=",".join(STEMS), help=f"comma-separated, of {STEMS}")
    args = p.parse_args()
    stems = args.stems.split(",")
    if set(stems) - set(STEMS):
        p.error(f"--stems: unknown {sorted(set(stems) - set(STEMS))}; choose from {STEMS}")
    options = perf.XLA_CPU_OPTIONS[args.xla_cpu] if jax.default_backend() == "cpu" else {}
    cfg = config.load(args.exp)
    x = jax.random.normal(jax.random.key(0), (cfg.batch_size, cfg.image_size, cfg.image_size, 3))
    y = jnp.arange(cfg.batch_size) % cfg.num_classes
    fns = {(stem, what): fn for stem in stems
           for what, fn in compiled(cfg, stem, options, x, y).items()}
    times: dict = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            jax.block_until_ready(fn())
            t0 = time.perf_counter()
            for _ in range(args.calls):
                out = fn()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / args.calls * 1e3)
    compile_ = f"XLA:CPU compile {args.xla_cpu}" if jax.default_backend() == "cpu" else "XLA"
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; {args.exp}, batch "
          f"{cfg.batch_size}, {compile_}; median (min) of {args.repeats} repeats of "
          f"{args.calls} calls, ms\n")
    print("| measured | " + " | ".join(f"stem {s}" for s in stems) + " |\n|---|"
          + "---:|" * len(stems))
    for what in ("fwd+bwd", "train step"):
        cells = [f"{statistics.median(times[(s, what)]):.2f} ({min(times[(s, what)]):.2f})"
                 for s in stems]
        print(f"| {what} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
