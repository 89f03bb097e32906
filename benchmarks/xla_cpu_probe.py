"""Which XLA:CPU lowering is fastest for our models here? fwd+bwd per pool form x compile option.

    python benchmarks/xla_cpu_probe.py --model baseline --model target --repeats 6

Times one jitted forward+backward (batch 32, 64x64x3, train-mode BatchNorm) of each model for
every combination of
  * the 2x2 max-pool form: `reduce` (reshape, then `.max(axis=(2, 4))`: a reduction) or
    `maxima` (reshape, then elementwise maxima: what `models.max_pool_2x2` does),
  * BaselineCNN's first convolution: `xla` (XLA's convolution) or `taps` (`models.tap_conv`, what
    `perf.stem_conv = "auto"` picks on CPU); TargetCNN always uses XLA's, and
  * the compile: every option set of `perf.XLA_CPU_OPTIONS` (XLA's defaults, YNNPACK for
    reductions only, YNNPACK off).
All variants run in one process, alternating within every repeat; the median is printed as a
Markdown table. This is the measurement behind `models.max_pool_2x2` and the candidates
of `perf.choose_xla_cpu` (which re-times them on every CPU a run starts on).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from jaxbench import models, perf

POOLS = {
    "reduce": lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2,
                                  x.shape[3]).max(axis=(2, 4)),
    "maxima": models.max_pool_2x2,
}
OPTIONS = perf.XLA_CPU_OPTIONS
STEMS = ("xla", "taps")


def compiled_step(name: str, pool, options, stem="taps"):
    """A compiled fwd+bwd of model `name` with `pool` as the max pool, `stem` as the stem conv."""
    model = {"baseline": lambda: models.BaselineCNN(10, stem_conv=models.STEM_CONVS[stem], pool=pool),
             "target": lambda: models.TargetCNN(10, pool=pool)}[name]()
    x = jax.random.normal(jax.random.key(0), (32, 64, 64, 3))
    y = jnp.arange(32) % 10
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    fn, _ = perf.compile_lowered(jax.jit(jax.grad(loss)).lower(variables["params"]), options)
    return fn, variables["params"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", action="append", choices=("baseline", "target"))
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; median of "
          f"{args.repeats} repeats, ms per fwd+bwd at batch 32\n")
    print("| model | pool | stem | compile | ms |\n|---|---|---|---|---:|")
    for name in args.model or ["baseline", "target"]:
        stems = STEMS if name == "baseline" else ("xla",)
        fns = {(pool, stem, opt): compiled_step(name, POOLS[pool], OPTIONS[opt], stem)
               for pool in POOLS for stem in stems for opt in OPTIONS}
        calls = 3 if name != "baseline" else 30
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, (fn, params) in fns.items():
                jax.block_until_ready(fn(params))
                t0 = time.perf_counter()
                for _ in range(calls):
                    out = fn(params)
                jax.block_until_ready(out)
                times[k].append((time.perf_counter() - t0) / calls * 1e3)
        for (pool, stem, opt), ts in times.items():
            print(f"| {name} | {pool} | {stem} | {opt} | {statistics.median(ts):.1f} |", flush=True)


if __name__ == "__main__":
    main()
