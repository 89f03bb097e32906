"""The benchmark's FLOP count: read off the traced train step, checked against a hand count."""

import jax
import jax.numpy as jnp
from jax import lax

from jaxbench import bench, config, train
from jaxbench.trainer import Trainer
from conftest import synthetic_split

# TargetCNN's 3x3 convolutions at 64x64 input: (height, width, in channels, out channels).
TARGET_CONVS = [(64, 64, 3, 64), (32, 32, 64, 128), (32, 32, 128, 128), (16, 16, 128, 256),
                (16, 16, 256, 256), (8, 8, 256, 512)]


def test_target_step_flops_match_a_hand_count():
    """A train step is 3x the forward convolutions (forward, input and weight gradients) less the
    first layer's input gradient (the image needs none); a 3x3 convolution makes 2 * 9 * Cin *
    Cout * H * W FLOPs per image, padding taps included. The dense layers add 0.03%. The count
    comes from the traced program, not from XLA's cost analysis of a compiled one, which on a GPU
    misses the convolutions handed to cuDNN (it reported ~0.01 GFLOP per TargetCNN step on an
    H200, and nothing at all for the unoptimized program on the GPU image)."""
    cfg = config.load("fmnist_target").replace(xla_cpu="default")
    trainer = Trainer(cfg, synthetic_split(64), synthetic_split(32, seed=1))
    b = cfg.batch_size
    convs = [2 * 9 * ci * co * h * w * b for h, w, ci, co in TARGET_CONVS]
    hand = (3 * sum(convs) - convs[0]) / 1e9  # 102.38 GFLOP at batch 32
    gflop = bench.step_gflop(trainer)
    assert hand <= gflop <= 1.001 * hand, (gflop, hand)


def test_the_count_ignores_how_the_stem_runs_and_walks_scans_and_conds():
    """`perf.stem_conv = taps` computes BaselineCNN's first convolution as products (no conv in
    the program): the count is the model's, so it is the same. A scan's body counts once per
    iteration, a cond its costliest branch."""
    cfg = config.load("tiny_baseline")
    assert train.step_flops(cfg.replace(stem_conv="taps")) == train.step_flops(cfg) > 1e9
    a = jnp.ones((8, 16))

    def looped(a):
        return lax.scan(lambda c, _: (c @ jnp.ones((16, 16)), None), a, length=5)[0]

    def branches(a, p):
        return lax.cond(p, lambda a: a @ jnp.ones((16, 4)), lambda a: (a @ jnp.ones((16, 16)))[:, :4], a)

    one = 2 * 8 * 16 * 16
    assert train.matmul_flops(jax.make_jaxpr(looped)(a)) == 5 * one
    assert train.matmul_flops(jax.make_jaxpr(branches)(a, True)) == one
