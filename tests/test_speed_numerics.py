"""The speed-minded lowerings compute what the textbook formulation computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbench import models


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
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64, 64, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 16))
    ours, ref = models.BaselineCNN(10), ReferenceBaseline(10)
    params = ours.init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(1e-3)

    def step(model, p):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y).mean()
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, _ = tx.update(g, tx.init(p), p)
        return loss, optax.apply_updates(p, updates)

    loss, new = step(ours, params)
    loss_ref, new_ref = step(ref, params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
