"""The paper's two networks in flax.linen, sized to its parameter counts.

Layout is NHWC (XLA's native layout on CPU and GPU). Inputs arrive already resized to 64x64x3
and normalized (see `data.preprocess`).

Widths, chosen to land on the paper's totals (exact counts in the README, from `nn.tabulate`):
  BaselineCNN: conv 16 -> pool -> conv 32 -> pool -> Dense 128 -> Dense classes
               1,055,082 params (10 classes), 1,079,592 (200 classes); paper: ~1.1M.
  TargetCNN:   [64] [128 128] [256 256] [512], max-pool between blocks, BN after every conv,
               GAP -> Dense 256 -> Dense classes
               2,423,882 params (10 classes), 2,472,712 (200 classes); paper: ~2.5M.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's BatchNorm defaults, stated explicitly so the PyTorch twin matches: flax's `momentum`
# is the weight of the old running value, so 0.9 here equals torch's momentum=0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
TARGET_BLOCKS: tuple[tuple[int, ...], ...] = ((64,), (128, 128), (256, 256), (512,))


def at_least_float32(dtype: Any) -> Any:
    """float32 for bfloat16 compute (logits, pooled features); float64 stays float64 (tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/stride-2 max pool as reshape + elementwise maxima.

    Equal to `nn.max_pool(x, (2, 2), (2, 2))` in value. Written without a reduction on purpose:
    the windowed op's gradient lowers to `select_and_scatter`, a slow path on XLA:CPU, and a
    `max` reduce over the window axes runs as a slow YNNPACK reduce fusion under the
    `ynn-reduce` compile (measurements: results/speed/xla_cpu_probe.md). Gradients
    differ from the windowed op only on exact ties inside a window (split between them rather
    than given to one element); after a ReLU such ties are zeros, whose gradient ReLU discards.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    rows = jnp.maximum(x[:, :, 0], x[:, :, 1])
    return jnp.maximum(rows[:, :, :, 0], rows[:, :, :, 1])


NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_and_pads(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                   lhs_dilation: Any, rhs_dilation: Any, dimension_numbers: Any,
                   feature_group_count: int, precision: Any) -> tuple[Callable, Any]:
    """lax's convolution with these arguments, and its explicit ((top, bottom), (left, right))
    padding when it is a stride-1, undilated, ungrouped NHWC/HWIO convolution (else None)."""
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                             padding=padding, lhs_dilation=lhs_dilation,
                             rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                             feature_group_count=feature_group_count, precision=precision)
    plain = (lhs.ndim == 4 and tuple(window_strides) == (1, 1) and feature_group_count == 1
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             # lax reads None as NCHW/OIHW: only an explicit NHWC/HWIO takes the other path.
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if not plain:
        return conv, None
    if isinstance(padding, str):  # flax passes "SAME" through as a string
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    pads = tuple(tuple(int(p) for p in pair) for pair in padding)
    # Negative padding (cropping) is lax's to do: jnp.pad refuses it.
    return conv, pads if min(p for pair in pads for p in pair) >= 0 else None


def tap_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
             lhs_dilation: Any = None, rhs_dilation: Any = None, dimension_numbers: Any = None,
             feature_group_count: int = 1, precision: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` whose forward pass is a sum of shifted, broadcast products.

    XLA:CPU's convolution kernels run far below the machine's peak on a layer that reads only a
    few channels (the 3-channel image: the GEMM they pack is 27 deep). Written as 9*C broadcast
    multiply-adds, the forward pass is one loop fusion over the output, vectorized along its
    channels. It runs as the taken branch of a `lax.cond` for a reason: XLA would otherwise fuse
    (and so recompute) the 9*C products into each consumer of the output (ReLU, pooling and their
    gradients), and it drops `optimization_barrier`s before fusion; a branch computation is a
    boundary fusion cannot cross. The predicate is true unless the weights hold a NaN, where the
    other branch returns NaNs, so divergence still shows in the loss. Chosen by the run's
    `perf.stem_conv` setting; measurements in results/speed/.
    The backward pass stays XLA's convolution, so values differ from `lax.conv_general_dilated`
    only by float summation order. Anything but a stride-1, undilated, ungrouped NHWC/HWIO
    convolution goes to `lax.conv_general_dilated` unchanged. A drop-in for flax's
    `nn.Conv(..., conv_general_dilated=...)`.
    """
    conv, pads = _conv_and_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision)
    if pads is None:
        return conv(lhs, rhs)
    (top, bottom), (left, right) = pads

    def products(x, w):
        kh, kw, c, _ = w.shape
        out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        return functools.reduce(jnp.add, (x[:, i:i + out_h, j:j + out_w, k:k + 1] * w[i, j, k]
                                          for i in range(kh) for j in range(kw) for k in range(c)))

    @jax.custom_vjp
    def taps(x, w):
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out = jax.eval_shape(products, x, w)
        return lax.cond(w.ravel()[0] == w.ravel()[0], products,
                        lambda x, w: jnp.full(out.shape, jnp.nan, out.dtype), x, w)

    taps.defvjp(lambda x, w: (taps(x, w), (x, w)),
                lambda res, g: jax.vjp(conv, *res)[1](g))
    return taps(lhs, rhs)


def patch_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
               lhs_dilation: Any = None, rhs_dilation: Any = None, dimension_numbers: Any = None,
               feature_group_count: int = 1, precision: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` as one matrix product over image patches (im2col).

    For the layer that reads the image, whose 3 channels make a 27-deep product: in an H200
    trace of TargetCNN (results/speed/2026-11-28-197b41e-nvidia-h200/trace/) cuDNN ran that
    layer's weight gradient in a legacy kernel (`wgrad_alg0_engine`, 52 us for 0.45 GFLOP) and its
    forward pass, with two layout conversions, in 27 us: ~6% of the 1.23 ms step. Here the 9
    shifted copies of the padded input are concatenated along channels (kh*kw*C = 27 per pixel)
    and multiplied by the (27, out) weight matrix; autodiff's weight gradient is the transposed
    product. Values differ from lax's convolution by float summation order, and both run at
    JAX's default matmul precision. Anything but a stride-1, undilated, ungrouped NHWC/HWIO
    convolution goes to `lax.conv_general_dilated` unchanged. A drop-in for flax's
    `nn.Conv(..., conv_general_dilated=...)`, chosen by the run's `perf.stem_conv`.
    """
    conv, pads = _conv_and_pads(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision)
    if pads is None:
        return conv(lhs, rhs)
    kh, kw, c, out = rhs.shape
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)],
                              axis=-1)  # (n, h, w, kh*kw*c), taps in rhs's (i, j, c) order
    return lax.dot_general(patches, rhs.reshape(kh * kw * c, out), (((3,), (0,)), ((), ())),
                           precision=precision)


# perf.stem_conv -> the first layer's `conv_general_dilated` for flax (None: lax's)
STEM_CONVS = {"xla": None, "taps": tap_conv, "patches": patch_conv}


class BaselineCNN(nn.Module):
    """Two Conv3x3 -> ReLU -> MaxPool2 blocks, flatten, Dense(128) -> ReLU, Dense(classes)."""

    num_classes: int
    widths: Sequence[int] = (16, 32)
    hidden: int = 128
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32 (flax's param_dtype)
    stem_conv: Callable | None = None  # the first layer's convolution; None: lax's (flax default)
    pool: Callable = max_pool_2x2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        del train  # no normalization, no dropout: the flag exists for a uniform model interface
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype,
                        conv_general_dilated=None if i else self.stem_conv)(x)
            x = self.pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(at_least_float32(self.dtype))


class TargetCNN(nn.Module):
    """Four conv blocks of growing width, Conv -> BatchNorm -> ReLU throughout, GAP, Dense(256)."""

    num_classes: int
    blocks: Sequence[Sequence[int]] = TARGET_BLOCKS
    hidden: int = 256
    dtype: Any = jnp.float32
    stem_conv: Callable | None = None  # the first layer's convolution; None: lax's (flax default)
    pool: Callable = max_pool_2x2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        for i, block in enumerate(self.blocks):
            for j, width in enumerate(block):
                # No conv bias: the BatchNorm that follows has its own shift.
                x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                            conv_general_dilated=None if i or j else self.stem_conv)(x)
                x = nn.relu(bn(train, self.dtype)(x))
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        x = x.mean(axis=(1, 2), dtype=at_least_float32(self.dtype))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(at_least_float32(self.dtype))


def bn(train: bool, dtype: Any = jnp.float32) -> nn.BatchNorm:
    """BatchNorm as PyTorch sets it; flax computes its statistics in float32 whatever `dtype`."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype)


class DenseLayer(nn.Module):
    """BN -> ReLU -> Conv1x1 (bottleneck, 4k) -> BN -> ReLU -> Conv3x3 (k); output concatenated."""

    growth: int
    bottleneck: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = nn.Conv(self.bottleneck * self.growth, (1, 1), use_bias=False, dtype=self.dtype)(
            nn.relu(bn(train, self.dtype)(x)))
        y = nn.Conv(self.growth, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(
            nn.relu(bn(train, self.dtype)(y)))
        return jnp.concatenate([x.astype(y.dtype), y], axis=-1)


class Transition(nn.Module):
    """BN -> ReLU -> Conv1x1 (compressing channels) -> 2x2 average pool."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.Conv(self.channels, (1, 1), use_bias=False, dtype=self.dtype)(
            nn.relu(bn(train, self.dtype)(x)))
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class DenseNetBC(nn.Module):
    """DenseNet-BC (Huang et al. 2017) for 64x64 inputs, sized to TargetCNN's ~2.5M parameters.

    Stem: Conv3x3 (2k channels) at full resolution, then 2x2 max pool to 32x32 (the ImageNet stem's
    7x7/2 conv + pool would leave 16x16 before the first block, too coarse for 64x64 images).
    Dense blocks of `blocks` layers with growth rate k, transitions halving channels and resolution
    (32 -> 16 -> 8 -> 4), then BN -> ReLU -> global average pool -> Dense(classes).
    k = 24 and blocks (6, 12, 18, 8) give 2,558,170 parameters (10 classes), 2,654,120 (200).
    """

    num_classes: int
    growth: int = 24
    blocks: Sequence[int] = (6, 12, 18, 8)
    compression: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        x = nn.Conv(2 * self.growth, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
        x = max_pool_2x2(nn.relu(bn(train, self.dtype)(x)))
        for i, layers in enumerate(self.blocks):
            for _ in range(layers):
                x = DenseLayer(self.growth, dtype=self.dtype)(x, train)
            if i < len(self.blocks) - 1:
                x = Transition(int(x.shape[-1] * self.compression), dtype=self.dtype)(x, train)
        x = nn.relu(bn(train, self.dtype)(x)).mean(axis=(1, 2), dtype=at_least_float32(self.dtype))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(at_least_float32(self.dtype))


def build(name: str, num_classes: int, dtype: str = "float32", stem_conv: str = "xla") -> nn.Module:
    """Model by the experiment's `model` key, computing in `dtype`.

    `stem_conv` (a key of STEM_CONVS, the run's resolved `perf.stem_conv`) is the first
    convolution of BaselineCNN and TargetCNN; DenseNet-BC uses XLA's convolutions throughout
    (`perf.resolve` records `xla` for it).
    """
    dtype = jnp.dtype(dtype)
    if name == "baseline":
        return BaselineCNN(num_classes, dtype=dtype, stem_conv=STEM_CONVS[stem_conv])
    if name == "target":
        return TargetCNN(num_classes, dtype=dtype, stem_conv=STEM_CONVS[stem_conv])
    if name == "densenet":
        return DenseNetBC(num_classes, dtype=dtype)
    raise ValueError(f"unknown model {name!r}")
