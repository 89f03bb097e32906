"""`dtype = "bfloat16"`: bfloat16 compute, float32 parameters, optimizer state and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import config, models, train
from jaxbench.config import ConfigError


@pytest.mark.parametrize("name", ["baseline", "target"])
def test_bfloat16_model_computes_in_bfloat16_and_keeps_float32_params(name):
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    full, half = models.build(name, 10), models.build(name, 10, "bfloat16")
    variables = full.init(jax.random.key(1), x[:1], train=False)
    assert jax.tree.leaves(half.init(jax.random.key(1), x[:1], train=False)["params"])[0].dtype \
        == jnp.float32
    hlo = jax.jit(lambda v, x: half.apply(v, x, train=False)).lower(variables, x).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    logits, ref = half.apply(variables, x, train=False), full.apply(variables, x, train=False)
    assert logits.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits: close to float32, not equal to it.
    assert 0 < float(jnp.max(jnp.abs(logits - ref))) <= 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_bfloat16_train_step_lowers_the_loss_and_keeps_float32_state():
    cfg = config.load("fmnist_target").replace(dtype="bfloat16")
    state = train.create_state(cfg, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64, 64, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
    step = jax.jit(train.train_step)
    losses = []
    for _ in range(6):
        state, m = step(state, x, y)
        losses.append(float(m["loss"]) / 16)
    assert losses[-1] < 0.9 * losses[0], losses
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype must be one of"):
        config.load("fmnist_baseline").replace(dtype="float16")
