"""Per-layer convolution throughput: XLA:CPU (as the train step compiles it) vs PyTorch's oneDNN.

    python benchmarks/conv_layers.py --repeats 5 > results/speed/conv_layers.md

For every 3x3 convolution of BaselineCNN and TargetCNN at batch 32, times the forward pass and the
forward plus backward pass (input and weight gradients; only the weight gradient for a layer that
reads the image, as in training) in JAX, compiled as `jaxbench.train` compiles the step
(`perf.compile_lowered` with the `ynn-reduce` options; BaselineCNN's first layer as `models.tap_conv`), and in PyTorch
(NCHW, as the twin runs, and channels-last). Also the float32 2048^2 matmul that the benchmark uses
as its yardstick. Everything runs in one process, variants alternating within each repeat; medians
are printed as a Markdown table. This is where the TargetCNN's JAX/PyTorch ratio comes from: the
convolutions are nearly all of its step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
from jax import lax

from jaxbench import bench, models, perf

BATCH = 32
# (model, resolution, in channels, out channels); the first layer of each model reads the image.
LAYERS = [("baseline", 64, 3, 16), ("baseline", 32, 16, 32),
          ("target", 64, 3, 64), ("target", 32, 64, 128), ("target", 32, 128, 128),
          ("target", 16, 128, 256), ("target", 16, 256, 256), ("target", 8, 256, 512)]


def timer(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A timer: the mean ms of `calls` back-to-back calls of `fn` (which must block)."""
    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e3
    return once


def jax_layer(model: str, size: int, cin: int, cout: int) -> dict[str, Callable[[], None]]:
    key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key[0], (BATCH, size, size, cin))
    w = jax.random.normal(key[1], (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(key[2], (BATCH, size, size, cout))
    # BaselineCNN's first layer as `perf.stem_conv = "auto"` picks it on CPU
    conv_fn = models.tap_conv if (model, cin) == ("baseline", 3) else lax.conv_general_dilated
    dims = lax.conv_dimension_numbers(x.shape, w.shape, models.NHWC)

    def conv(x, w):
        return conv_fn(x, w, (1, 1), "SAME", dimension_numbers=dims)

    def fwd_bwd(x, w, g):
        if cin == 3:  # the image needs no gradient
            out, vjp = jax.vjp(lambda w: conv(x, w), w)
        else:
            out, vjp = jax.vjp(conv, x, w)
        return out, vjp(g)

    options = perf.XLA_CPU_OPTIONS["ynn-reduce"]
    fwd, _ = perf.compile_lowered(jax.jit(conv).lower(x, w), options)
    both, _ = perf.compile_lowered(jax.jit(fwd_bwd).lower(x, w, g), options)
    return {"fwd": lambda: fwd(x, w).block_until_ready(),
            "fwd+bwd": lambda: jax.block_until_ready(both(x, w, g))}


def torch_layer(size: int, cin: int, cout: int, channels_last: bool) -> dict:
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(BATCH, cin, size, size).to(memory_format=fmt).requires_grad_(cin != 3)
    w = (torch.randn(cout, cin, 3, 3) * 0.1).requires_grad_()
    g = torch.randn(BATCH, cout, size, size).to(memory_format=fmt)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)

    def fwd_bwd():
        torch.nn.functional.conv2d(x, w, padding=1).backward(g)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch  # with its default thread count, as the twin runs

    peak = bench.matmul_peak_gflops()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {BATCH}; median of {args.repeats} repeats; "
          f"ms and GFLOP/s (fwd+bwd counts 3x the forward's FLOPs, 2x for a layer reading the "
          f"image). float32 2048^2 matmul under JAX, same run: {peak:.0f} GFLOP/s.\n")
    print("| model | layer | GFLOP fwd | JAX fwd | JAX fwd+bwd | torch fwd | torch fwd+bwd "
          "| torch channels-last fwd+bwd |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for model, size, cin, cout in LAYERS:
        gflop = 2 * BATCH * size * size * cin * cout * 9 / 1e9
        fns = {("jax", k): f for k, f in jax_layer(model, size, cin, cout).items()}
        fns.update({("torch", k): f for k, f in torch_layer(size, cin, cout, False).items()})
        fns[("torch-cl", "fwd+bwd")] = torch_layer(size, cin, cout, True)["fwd+bwd"]
        calls = max(2, int(0.3 / max(gflop / 150, 1e-4)))  # ~0.3 s per timing
        timers = {k: timer(f, calls) for k, f in fns.items()}
        for f in fns.values():
            f()
        times: dict = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, once in timers.items():
                times[k].append(once())
        cell = {}
        for (who, what), ts in times.items():
            ms = statistics.median(ts)
            flops = gflop * (1 if what == "fwd" else 2 if cin == 3 else 3)
            cell[(who, what)] = f"{ms:.2f} ({flops / ms * 1e3:.0f})"
        print(f"| {model} | {size}x{size} {cin}->{cout} | {gflop:.2f} | {cell[('jax', 'fwd')]} | "
              f"{cell[('jax', 'fwd+bwd')]} | {cell[('torch', 'fwd')]} | "
              f"{cell[('torch', 'fwd+bwd')]} | {cell[('torch-cl', 'fwd+bwd')]} |", flush=True)


if __name__ == "__main__":
    main()
