"""DenseNet-BC: size, shapes, dense connectivity, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import models, train


@functools.lru_cache(maxsize=None)
def params(classes):
    """Parameter shapes only (`jax.eval_shape`): an eager init of this deep network dispatches
    hundreds of ops one by one and took about a minute on a 2-core CPU."""
    init = functools.partial(models.DenseNetBC(classes).init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]


@pytest.mark.parametrize("classes, exact", [(10, 2_558_170), (200, 2_654_120)])
def test_parameter_count_is_close_to_target_cnn(classes, exact):
    n = train.param_count(params(classes))
    assert n == exact
    assert abs(n - 2.5e6) / 2.5e6 <= 0.10


@pytest.mark.parametrize("classes", [10, 200])
def test_output_shapes(classes):
    model = models.DenseNetBC(classes)
    x = jax.ShapeDtypeStruct((3, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), x)
    assert jax.eval_shape(functools.partial(model.apply, train=False), variables, x).shape == (3, classes)
    logits, _ = jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                               variables, x)
    assert logits.shape == (3, classes)


def test_channels_grow_by_k_per_layer_inside_a_block():
    k, p = 24, params(10)
    # Block 1 starts from the stem's 2k channels; every layer sees all earlier outputs.
    inputs = [p[f"DenseLayer_{i}"]["Conv_0"]["kernel"].shape[2] for i in range(6)]
    assert inputs == [2 * k + i * k for i in range(6)]
    assert all(p[f"DenseLayer_{i}"]["Conv_1"]["kernel"].shape == (3, 3, 4 * k, k) for i in range(6))
    # The transition compresses by half: (48 + 6 * 24) / 2 = 96 channels into block 2.
    assert p["Transition_0"]["Conv_0"]["kernel"].shape == (1, 1, 192, 96)
    assert p["DenseLayer_6"]["Conv_0"]["kernel"].shape[2] == 96


def test_dense_layer_concatenates_its_input():
    layer = models.DenseLayer(growth=5)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 7))
    # Compiled: eager dispatch compiles each random initializer op by op (~15 s on 2 cores).
    v = jax.jit(functools.partial(layer.init, train=False))(jax.random.key(1), x)
    y = jax.jit(functools.partial(layer.apply, train=False))(v, x)
    assert y.shape == (2, 8, 8, 12)
    np.testing.assert_array_equal(y[..., :7], x)
