"""The speed-minded lowerings compute what the textbook formulation computes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbench import models, train


class ReferenceBaseline(nn.Module):
    """BaselineCNN written plainly, with flax's windowed nn.max_pool (select_and_scatter)."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train=True):
        for width in (16, 32):
            x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def test_optimized_baseline_step_matches_the_reference_formulation():
    """Our BaselineCNN (reshape max pool, tap-sum stem on CPU) vs flax's plain layers.

    Compares the loss and each gradient tensor (relative norm), not an Adam update: Adam's first
    step is ~lr * sign(g), which flips on float noise wherever a gradient entry is ~0.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64, 64, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 16))
    ours, ref = models.BaselineCNN(10), ReferenceBaseline(10)
    params = ours.init(jax.random.key(0), x[:1])["params"]

    def loss_and_grad(model):
        return jax.jit(jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y).mean()))(params)

    (loss, grads), (loss_ref, grads_ref) = loss_and_grad(ours), loss_and_grad(ref)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


@pytest.mark.parametrize("name", ["baseline", "target"])
def test_cpu_compiler_options_compute_the_same_step(name):
    """train.CPU_COMPILER_OPTIONS change which kernels XLA:CPU uses, not what a step computes.

    Judged against the same step in float64: the tuned compile's loss and gradients must be as
    close to it as the default compile's are (BatchNorm's backward cancels terms, so float32
    summation order alone moves some gradient entries by ~1e-3 relative).
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
    y = jnp.asarray(rng.integers(0, 10, 8))
    model = models.build(name, 10)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss_and_grad(params, x, model=model):
        def loss_fn(p):
            logits, _ = model.apply({**variables, "params": p}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jax.value_and_grad(loss_fn)(params)

    lowered = jax.jit(loss_and_grad).lower(variables["params"], x)
    tuned, _ = train.compile_lowered(lowered, tuned=True)
    if jax.default_backend() == "cpu":  # the options took effect: no YNNPACK convolutions left
        assert "convolution" in tuned.as_text() and "ynn" not in _conv_lines(tuned.as_text())
    ours = tuned(variables["params"], x)
    default = lowered.compile()(variables["params"], x)
    with jax.enable_x64(True):
        exact = jax.jit(functools.partial(loss_and_grad, model=models.build(name, 10, "float64")))(
            jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]),
            x.astype(np.float64))
        exact = jax.tree.map(np.asarray, exact)  # float64 numpy, usable outside the context
    assert exact[0].dtype == np.float64
    def errors(result):
        loss, grads = result
        return [abs(float(loss) - float(exact[0]))] + [
            float(np.linalg.norm(np.asarray(g, np.float64) - e) / np.linalg.norm(e))
            for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact[1]))]
    for ours_err, default_err in zip(errors(ours), errors(default)):
        assert ours_err <= 3 * default_err + 1e-5


def _conv_lines(hlo: str) -> str:
    return "\n".join(line for line in hlo.splitlines() if " convolution(" in line)


def test_a_rejected_compiler_option_falls_back_to_xla_defaults(monkeypatch):
    """A future jaxlib without the experimental option still trains, and says why it is slower."""
    if jax.default_backend() != "cpu":
        pytest.skip("the options apply to XLA:CPU only")
    monkeypatch.setattr(train, "CPU_COMPILER_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    lowered = jax.jit(lambda a: a * 2).lower(jnp.ones(3))
    with pytest.warns(UserWarning, match="compiling with XLA's defaults"):
        compiled, options = train.compile_lowered(lowered)
    np.testing.assert_array_equal(compiled(jnp.ones(3)), 2 * np.ones(3))
    assert options == {}  # the run records the defaults it really compiled with


@pytest.mark.parametrize("batch, strides, padding", [
    (4, (1, 1), "SAME"), (4, (1, 1), ((2, 0), (1, 1))), (4, (1, 1), "VALID"),
    (3, (1, 1), "SAME"),
    (4, (2, 2), "SAME"),  # strided: falls back to lax
])
def test_tap_conv_equals_lax_conv_in_value_and_gradient(batch, strides, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(batch, 10, 12, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 8)).astype(np.float32))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, models.NHWC)

    def loss(conv, x, w):
        out = conv(x, w, strides, padding, dimension_numbers=dims)
        return (out * jnp.cos(out)).sum(), out

    (ref_loss, ref), ref_grads = jax.value_and_grad(
        functools.partial(loss, jax.lax.conv_general_dilated), argnums=(0, 1), has_aux=True)(x, w)
    (tap_loss, tap), tap_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, models.tap_conv), argnums=(0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(tap, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tap_loss, ref_loss, rtol=1e-5)
    for a, b in zip(tap_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", [(0, 0, 0, 0), (1, 2, 0, 3)])
def test_tap_conv_lets_nan_weights_show(where):
    """The branch predicate reads one weight: a NaN there must not silently zero the output."""
    x = jnp.ones((2, 6, 6, 3))
    w = jnp.ones((3, 3, 3, 4)).at[where].set(jnp.nan)
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, models.NHWC)
    out = jax.jit(lambda x, w: models.tap_conv(x, w, (1, 1), "SAME", dimension_numbers=dims))(x, w)
    assert np.isnan(np.asarray(out)).any()


def test_baseline_stem_runs_as_taps_once_per_step_on_cpu():
    """The stem's fast path is taken, and XLA does not recompute its products in the backward.

    Guards the two ways it silently stops paying: flax handing `padding="SAME"` through as a
    string (the fast path was skipped), and XLA fusing the 27 products into every consumer of
    the output (fwd+bwd measured 20 -> 57 ms when that happened).
    """
    if jax.default_backend() != "cpu":
        pytest.skip("tap_conv is the CPU stem only")
    model = models.build("baseline", 10)
    x = jnp.ones((8, 64, 64, 3))
    params = model.init(jax.random.key(0), x[:1])["params"]
    forward = jax.jit(lambda p: model.apply({"params": p}, x)).lower(params).as_text()
    assert forward.count(" stablehlo.convolution") == 1  # the second layer's only
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum())).lower(params)
    compiled, _ = train.compile_lowered(grad)
    # 27 products once, plus the few multiplies of the rest of the step (35 in all with jaxlib
    # 0.10.2); fused into each consumer they number over 100.
    assert compiled.as_text().count(" multiply(") < 2 * 27
