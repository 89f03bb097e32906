"""The speed-minded lowerings compute what the textbook formulation computes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbench import models, perf, train


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
    ours, ref = models.build("baseline", 10, stem_conv="taps"), ReferenceBaseline(10)
    params = train.init_variables(ours, jax.random.key(0), x[:1])["params"]  # compiled init

    def loss_and_grad(model):
        return jax.jit(jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y).mean()))(params)

    (loss, grads), (loss_ref, grads_ref) = loss_and_grad(ours), loss_and_grad(ref)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)


def _float64_errors(name, batch, compile_options):
    """Loss and per-tensor gradient errors against float64, for each of `compile_options`."""
    lowered, params, exact = perf.float32_and_float64_steps(name, batch)
    assert jax.tree.leaves(exact)[0].dtype == np.float64
    errors = {}
    for label, options in compile_options.items():
        fn, used = perf.compile_lowered(lowered, options)
        assert used == options
        errors[label] = perf.relative_errors(fn(params), exact)
    return errors


@pytest.mark.parametrize("name", ["baseline", "target"])
def test_the_compile_auto_picks_is_float32_exact_here(name):
    """Whatever `perf.xla_cpu = "auto"` picks on this CPU computes the float32 step.

    Judged against the same step in float64: the chosen compile's loss and gradients must be as
    close to it as XLA's default compile's are (BatchNorm's backward cancels terms, so float32
    summation order alone moves some gradient entries by ~1e-3 relative; whole tensors by ~1e-6).
    Every candidate the self-check lets through must pass this too: the gate is at least as
    strict as this test, on any CPU (on one where `ynn-reduce` loses precision, it is rejected).
    """
    if jax.default_backend() != "cpu":
        pytest.skip("the XLA:CPU compile choice")
    batch = 8
    chosen, record = perf.choose_xla_cpu(name, 10, "taps" if name == "baseline" else "xla",
                                         batch, 64)
    assert record["candidates"][chosen]["agrees"]
    assert chosen == "default" or record["candidates"][chosen]["max_error"] <= perf.AGREEMENT
    passed = {k: perf.XLA_CPU_OPTIONS[k] for k, v in record["candidates"].items() if v.get("agrees")}
    errors = _float64_errors(name, batch, passed)
    for label in passed:
        for ours, default in zip(errors[label], errors["default"]):
            assert ours <= 3 * default + 1e-5, (label, ours, default)


def test_the_gate_rejects_a_compile_that_changes_the_numbers():
    """A compile whose gradients are off by 1% (as `ynn-reduce` was on an AMX Xeon) is not used."""
    if jax.default_backend() != "cpu":
        pytest.skip("the XLA:CPU compile choice")

    class Perturbed:  # an executable whose gradients come out 1% large
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, params):
            loss, grads = self.fn(params)
            return loss, jax.tree.map(lambda g: g * 1.01, grads)

    def compile_fn(lowered, options):
        fn, used = perf.compile_lowered(lowered, options)
        return (Perturbed(fn) if options == perf.XLA_CPU_OPTIONS["ynn-reduce"] else fn), used

    chosen, record = perf.choose_xla_cpu.__wrapped__(
        "baseline", 10, "xla", 4, 64, candidates=("ynn-reduce",), compile_fn=compile_fn)
    assert chosen == "default"
    bad = record["candidates"]["ynn-reduce"]
    assert not bad["agrees"] and 5e-3 < bad["max_error"] < 2e-2


def test_a_run_records_its_compile_and_a_resume_reuses_it():
    """resolve: 'auto' runs the check once; a previous record is taken as it is (same program)."""
    calls = []

    def choose(*args):
        calls.append(args)
        return "ynn-off", {"candidates": {}}

    first = perf.resolve(perf.Perf(), "cpu", "target", 10, 32, 64, choose=choose)
    assert first.xla_cpu == "ynn-off" and first.compiler_options == perf.XLA_CPU_OPTIONS["ynn-off"]
    again = perf.resolve(perf.Perf(), "cpu", "target", 10, 32, 64, previous=first.to_dict(),
                         choose=choose)
    assert again == first and len(calls) == 1
    gpu = perf.resolve(perf.Perf(), "gpu", "baseline", 10, 32, 64, choose=choose)
    assert (gpu.xla_cpu, gpu.stem_conv, gpu.steps_per_call) == ("default", "xla", 50)
    assert len(calls) == 1  # no self-check off CPU
    # DenseNet-BC has no stem setting: the record says what runs, whatever was asked.
    dense = perf.resolve(perf.Perf(stem_conv="patches"), "gpu", "densenet", 10, 32, 64)
    assert dense.stem_conv == "xla" and "DenseNet" in dense.reasons["stem_conv"]


def test_options_xla_rejects_fall_back_to_its_default_compile(monkeypatch):
    """An XLA without an option set's flags compiles every call with its defaults (one warning,
    no failed run) and the run records the compile that really ran."""
    from conftest import synthetic_split
    from jaxbench import config
    from jaxbench.trainer import Trainer

    monkeypatch.setitem(perf.XLA_CPU_OPTIONS, "ynn-off", {"xla_no_such_option": "1"})
    cfg = config.load("fmnist_baseline").replace(batch_size=16, steps_per_call=3,
                                                 xla_cpu="ynn-off", image_size=32)
    trainer = Trainer(cfg, synthetic_split(64), synthetic_split(16, seed=1))  # 4 steps: 3 + 1
    with pytest.warns(UserWarning, match="XLA rejected") as caught:
        trainer.compile(trainer.init_state())
    assert len(caught) == 1 and sorted(trainer.train_fns) == [1, 3]  # the tail asks no more
    assert trainer.perf.xla_cpu == "default" and trainer.perf.compiler_options == {}
    assert "rejected" in trainer.record()["perf"]["reasons"]["xla_cpu"]


@pytest.mark.parametrize("stem", [models.tap_conv, models.patch_conv], ids=["taps", "patches"])
@pytest.mark.parametrize("batch, strides, padding", [
    (4, (1, 1), "SAME"), (4, (1, 1), ((2, 0), (1, 1))), (4, (1, 1), "VALID"),
    (3, (1, 1), "SAME"),
    (4, (2, 2), "SAME"),  # strided: falls back to lax
    (4, (1, 1), ((1, 1), (1, -1))),  # cropping: falls back to lax
])
def test_stem_convs_equal_lax_conv_in_value_and_gradient(stem, batch, strides, padding):
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
        functools.partial(loss, stem), argnums=(0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(tap, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tap_loss, ref_loss, rtol=1e-5)
    # Float32 rounding of the output, magnified by the loss's cos(out) - out * sin(out): an
    # atol relative to the gradients' scale (they reach ~100 here).
    for a, b in zip(tap_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


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
    model = models.build("baseline", 10, stem_conv="taps")
    x = jnp.ones((8, 64, 64, 3))
    # Shapes only: the programs are lowered and compiled here, never run.
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))["params"]
    forward = jax.jit(lambda p: model.apply({"params": p}, x)).lower(params).as_text()
    assert forward.count(" stablehlo.convolution") == 1  # the second layer's only
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum())).lower(params)
    compiled, _ = perf.compile_lowered(grad, perf.XLA_CPU_OPTIONS["ynn-reduce"])
    # 27 products once, plus the few multiplies of the rest of the step (35 in all with jaxlib
    # 0.10.2); fused into each consumer they number over 100.
    assert compiled.as_text().count(" multiply(") < 2 * 27


@pytest.mark.parametrize("name", ["baseline", "target"])
def test_the_patches_stem_trains_what_xla_s_convolution_trains(name):
    """`stem_conv = "patches"`: the same parameters (a checkpoint of either loads in the other),
    the first layer a matrix product instead of a convolution, and the same loss and gradients.

    In float32 for BaselineCNN. TargetCNN's float32 gradients are chaotic in the last bits: a
    forward pass that differs by rounding flips the odd ReLU or max-pool decision next to a tie,
    and each flip moves a whole upstream gradient entry (nudging the input by 1e-7 moves XLA's
    own gradients by 4e-3 to 1e-2, relative norm); so its gradients are compared in float64,
    where rounding is too small to flip any, and must agree to float64 accuracy."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 64, 64, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 8))
    plain, patches = (models.build(name, 10, stem_conv=s) for s in ("xla", "patches"))
    variables = train.init_variables(plain, jax.random.key(0), x[:1])
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(lambda: patches.init(jax.random.key(0), x[:1])))

    def program(model):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables["params"])

    lowered = {s: program(m) for s, m in (("xla", plain), ("patches", patches))}
    convs = {s: lo.as_text().count(" stablehlo.convolution") for s, lo in lowered.items()}
    assert convs["patches"] < convs["xla"]  # the first layer's forward (and its gradients)
    ((loss, logits), grads), ((ref_loss, ref_logits), ref_grads) = (
        lowered[s].compile()(variables["params"]) for s in ("patches", "xla"))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    if name == "target":
        with jax.enable_x64(True):
            grads, ref_grads = (
                jax.tree.map(np.asarray, lo.compile()(p)[1]) for lo, p in (
                    perf.gradient_program(models.build(name, 10, "float64", stem_conv=s), 4, 32,
                                          10, np.float64, variables) for s in ("patches", "xla")))
        assert jax.tree.leaves(grads)[0].dtype == np.float64
    tolerance = 1e-4 if name == "baseline" else 1e-10
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(b)
