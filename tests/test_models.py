import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import config, models, train


def count(model, classes):
    """Parameter count from shapes alone (`jax.eval_shape`: no eager init, no compile)."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    return train.param_count(variables["params"])


@pytest.mark.parametrize("classes", [10, 200])
def test_param_counts_match_the_paper(classes):
    baseline = count(models.BaselineCNN(classes), classes)
    target = count(models.TargetCNN(classes), classes)
    assert abs(baseline - 1.1e6) / 1.1e6 <= 0.05, baseline
    assert abs(target - 2.5e6) / 2.5e6 <= 0.05, target
    # The exact totals the README's tables show.
    assert (baseline, target) == {10: (1_055_082, 2_423_882), 200: (1_079_592, 2_472_712)}[classes]


@pytest.mark.parametrize("name", ["baseline", "target"])
@pytest.mark.parametrize("classes", [10, 200])
def test_output_shapes(name, classes):
    model = models.build(name, classes)
    x = jax.ShapeDtypeStruct((5, 64, 64, 3), jnp.float32)  # shapes only: no eager dispatch
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), x)
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x).shape == (5, classes)
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert logits.shape == (5, classes)
    assert ("batch_stats" in updates) == (name == "target")


def test_batchnorm_uses_pytorch_defaults():
    variables = jax.eval_shape(lambda x: models.TargetCNN(10).init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert len(variables["batch_stats"]) == 6  # one per conv
    bn = nn.BatchNorm(momentum=models.BN_MOMENTUM, epsilon=models.BN_EPSILON)
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)


def test_reshape_max_pool_equals_windowed_max_pool():
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))  # continuous values: no ties
    ref = lambda v: nn.max_pool(v, (2, 2), (2, 2))
    np.testing.assert_array_equal(models.max_pool_2x2(x), ref(x))
    g = jax.grad(lambda v: (models.max_pool_2x2(v) ** 2).sum())(x)
    g_ref = jax.grad(lambda v: (ref(v) ** 2).sum())(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)


@pytest.mark.parametrize("exp,dtype", [
    ("fmnist_baseline", "float32"), ("fmnist_target", "float32"), ("fmnist_baseline", "bfloat16"),
    # TargetCNN's bfloat16 train step compiles for ~15 s on 2 CPU cores: slow. Its bfloat16
    # forward pass (BatchNorm included) is checked against float32 in tests/test_dtype.py.
    pytest.param("fmnist_target", "bfloat16", marks=pytest.mark.slow),
    # DenseNet-BC is beyond the paper; its compile alone takes a minute or more on 2 cores.
    pytest.param("fmnist_densenet", "float32", marks=pytest.mark.slow)])
def test_train_step_lowers_loss_on_a_fixed_batch(exp, dtype):
    cfg = config.load(exp).replace(dtype=dtype, image_size=32)
    state = train.create_state(cfg, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    # 32x32: the step does the same at any multiple of 16, in a quarter of the time.
    x = jnp.asarray(rng.normal(size=(16, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
    step = jax.jit(train.train_step)
    losses = []
    for _ in range(5):
        state, m = step(state, x, y)
        losses.append(float(m["loss"]) / 16)
    assert losses[-1] < losses[0] * 0.9, losses
    assert int(state.step) == 5
    # bfloat16 is compute only: parameters, optimizer state and BatchNorm statistics stay float32.
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
