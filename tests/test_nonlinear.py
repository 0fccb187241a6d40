"""The MPC-friendly nonlinearities against their exact counterparts."""

import jax.numpy as jnp
import numpy as np
import pytest

from mpc_llama import nonlinear
from mpc_llama.config import preset
from mpc_llama.errors import ConfigError


def test_silu_poly_error_bound():
    x = jnp.linspace(-30, 30, 60001)
    err = np.abs(np.asarray(nonlinear.silu_poly(x) - nonlinear.silu_exact(x)))
    assert err.max() < 6e-4


def test_clipped_softmax_matches_and_respects_mask():
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, 10)), jnp.float32)
    mask = jnp.arange(10) < 7
    exact = nonlinear.softmax_exact(x, mask)
    clipped = nonlinear.softmax_clipped(x, mask)
    np.testing.assert_allclose(clipped, exact, atol=1e-5)
    assert float(jnp.abs(clipped[:, 7:]).max()) == 0.0
    np.testing.assert_allclose(clipped.sum(-1), 1.0, rtol=1e-6)
    # values more than 14 below the max are dropped exactly
    p = nonlinear.softmax_clipped(jnp.asarray([0.0, -13.0, -15.0]))
    assert float(p[2]) == 0.0 and float(p[1]) > 0.0


def test_safe_rsqrt_floors_tiny_inputs():
    assert float(nonlinear.rsqrt_safe(jnp.asarray(1e-9))) == pytest.approx(2.0 ** 6)
    assert float(nonlinear.rsqrt_safe(jnp.asarray(4.0))) == pytest.approx(0.5)


@pytest.mark.parametrize("field,value", [("softmax", "bogus"), ("silu", "relu"),
                                         ("rsqrt", "x"), ("embedding", "take")])
def test_unknown_nonlinearity_names_fail(field, value):
    with pytest.raises(ConfigError, match=field):
        preset("tiny").replace(**{field: value})


def test_bad_shapes_fail():
    with pytest.raises(ConfigError, match="multiple"):
        preset("tiny").replace(n_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt-5")
