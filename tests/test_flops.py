"""The benchmark's FLOP count: from the unoptimized one-step program, checked against a hand count."""

from jaxbench import bench, config
from jaxbench.trainer import Trainer
from conftest import synthetic_split

# TargetCNN's 3x3 convolutions at 64x64 input: (height, width, in channels, out channels).
TARGET_CONVS = [(64, 64, 3, 64), (32, 32, 64, 128), (32, 32, 128, 128), (16, 16, 128, 256),
                (16, 16, 256, 256), (8, 8, 256, 512)]


def test_target_step_flops_match_a_hand_count():
    """A train step is 3x the forward convolutions (forward, input and weight gradients) less the
    first layer's input gradient (the image needs none). With SAME padding a 3x3 convolution
    makes 2 * Cin * Cout * (3H - 2) * (3W - 2) FLOPs per image: border outputs see fewer taps.
    The rest (dense layers, BatchNorm, ReLU, pooling, Adam) adds under 2%. Counting the compiled
    program instead would miss convolutions that a GPU compile hands to cuDNN (it reported ~0.01
    GFLOP per TargetCNN step on an H200).
    """
    cfg = config.load("fmnist_target").replace(xla_cpu="default")
    trainer = Trainer(cfg, synthetic_split(64), synthetic_split(32, seed=1))
    b = cfg.batch_size
    convs = [2 * ci * co * (3 * h - 2) * (3 * w - 2) * b for h, w, ci, co in TARGET_CONVS]
    hand = (3 * sum(convs) - convs[0]) / 1e9  # 94.70 GFLOP at batch 32
    gflop = bench.step_gflop(trainer)
    assert hand <= gflop <= 1.02 * hand, (gflop, hand)
