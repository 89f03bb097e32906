"""How far each XLA:CPU option set's float32 loss-and-gradient lies from the same step in float64.

`perf.choose_xla_cpu` keeps a faster option set only if its gradients agree with XLA's default
compile within `perf.AGREEMENT`. This script asks the other question: is the candidate as close to
the exact (float64) step as the default compile is? Where both are far from float64 by the same
order (BatchNorm's backward cancels terms, so float32 rounding is amplified toward the input), a
candidate can disagree with the default compile and still be as accurate.

    python benchmarks/float64_distance.py [--model target] [--batch 32]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.tree_util import keystr, tree_flatten_with_path

from jaxbench import perf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="target", choices=["baseline", "target"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    lowered, params, exact = perf.float32_and_float64_steps(args.model, args.batch,
                                                            args.classes)
    results = {}
    for name, options in perf.XLA_CPU_OPTIONS.items():
        fn, used = perf.compile_lowered(lowered, options)
        if used == options:
            results[name] = jax.tree.map(np.asarray, fn(params))

    print(f"{args.model}, batch {args.batch}: relative norm error per gradient tensor")
    print("| option set | vs float64: max | median | vs XLA's default: max |")
    print("|---|---:|---:|---:|")
    errs = {name: perf.relative_errors(r, exact)[1:] for name, r in results.items()}
    for name, to_exact in errs.items():
        to_default = perf.relative_errors(results[name], results["default"])[1:]
        print(f"| {name} | {max(to_exact):.2e} | {np.median(to_exact):.2e} | "
              f"{max(to_default):.2e} |")
    paths = [keystr(p) for p, _ in tree_flatten_with_path(exact[1])[0]]
    print("\nlargest errors against float64, per tensor:")
    order = sorted(range(len(paths)), key=lambda i: -max(e[i] for e in errs.values()))
    for i in order[:6]:
        print(f"  {paths[i]:32s} " + "  ".join(f"{n} {e[i]:.2e}" for n, e in errs.items()))


if __name__ == "__main__":
    main()
