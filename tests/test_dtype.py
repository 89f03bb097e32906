"""`dtype = "bfloat16"`: bfloat16 compute, float32 parameters, optimizer state and loss."""

import jax
import jax.numpy as jnp
import pytest

from jaxbench import config, models, train
from jaxbench.config import ConfigError


@pytest.mark.parametrize("name", ["baseline", "target"])
def test_bfloat16_model_computes_in_bfloat16_and_keeps_float32_params(name):
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    full, half = models.build(name, 10), models.build(name, 10, "bfloat16")
    variables = train.init_variables(full, jax.random.key(1), x[:1])  # compiled: no eager dispatch
    assert jax.tree.leaves(train.init_variables(half, jax.random.key(1), x[:1])["params"])[0].dtype \
        == jnp.float32
    half_apply = jax.jit(lambda v, x: half.apply(v, x, train=False))
    hlo = half_apply.lower(variables, x).as_text()
    assert "bf16" in hlo and "convolution" in hlo
    logits = half_apply(variables, x)
    ref = jax.jit(lambda v, x: full.apply(v, x, train=False))(variables, x)
    assert logits.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits: close to float32, not equal to it.
    assert 0 < float(jnp.max(jnp.abs(logits - ref))) <= 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="dtype must be one of"):
        config.load("fmnist_baseline").replace(dtype="float16")
