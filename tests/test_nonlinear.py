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


@pytest.mark.parametrize("name", sorted(nonlinear.SOFTMAX))
def test_deferred_normalisation_is_the_same_attention(name):
    """normalise=False gives the unnormalised weights (the row max's entry e^0 = 1) and the
    row reciprocal, whose product is the normalised softmax bit for bit; attention_values
    normalises after p . V to the same output, and attend (which defers) matches the
    normalised form. (SPU against plaintext: the model and policy tests.)"""
    from mpc_llama.model import attend, attention_scores, attention_values

    cfg = preset("tiny")
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(0, 2, (1, 3, cfg.n_heads, cfg.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(0, 2, (1, cfg.n_kv_heads, 9, cfg.head_dim)), jnp.float32)
            for _ in range(2))
    mask = (jnp.arange(9) < 7)[None, None, None, None, :]
    softmax = nonlinear.SOFTMAX[name]
    s = attention_scores(q, k, cfg)
    w = softmax(s, mask, normalise=False)
    assert isinstance(w, nonlinear.Weights) and w.recip.shape == s.shape[:-1] + (1,)
    np.testing.assert_allclose(w.p.max(axis=-1), 1.0, atol=2e-3)   # the poly exps' e^0
    assert float(jnp.abs(w.p[..., 7:]).max()) <= 2.0 ** -32   # taylor's fill: 2^-32
    probs = softmax(s, mask)
    np.testing.assert_array_equal(w.p * w.recip, probs)
    want = attention_values(probs, v, cfg)
    np.testing.assert_allclose(attention_values(w, v, cfg), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attend(q, k, v, mask, cfg.replace(softmax=name)), want,
                               rtol=1e-5, atol=1e-6)
    segments = (v[:, :, :4], v[:, :, 4:])   # row segments (SEMI2K's frozen prompt rows)
    np.testing.assert_allclose(attention_values(w, segments, cfg), want, rtol=1e-5, atol=1e-6)


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


def test_silu_split_error_bound_and_outliers():
    """relu(x) - g(min(|x|, 9)): within 7e-4 of the exact SiLU everywhere, outliers included
    (SmolLM2's residual stream reaches ~22,500)."""
    x = jnp.concatenate([jnp.linspace(-60, 60, 120001), jnp.asarray([-2.5e4, 2.5e4])])
    err = np.abs(np.asarray(nonlinear.silu_split(x) - nonlinear.silu_exact(x)))
    assert err.max() < 7e-4
    assert float(nonlinear.silu_split(jnp.asarray(0.0))) == pytest.approx(0.0, abs=7e-4)


def test_poly_exp_relative_error_and_poly_softmax():
    z = jnp.linspace(nonlinear.EXP_CLIP, 0.0, 28001)
    e = np.asarray(nonlinear.exp_clipped_poly(z))
    rel = np.abs(e - np.exp(z)) / (np.exp(z) + 1e-5)
    assert rel.max() < 2e-3
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, 10)), jnp.float32)
    mask = jnp.arange(10) < 7
    p = nonlinear.softmax_poly(x, mask)
    np.testing.assert_allclose(p, nonlinear.softmax_exact(x, mask), atol=2e-3)
    assert float(jnp.abs(p[:, 7:]).max()) == 0.0
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


def test_taylor_exp_error_and_taylor_softmax():
    """The degree-2 Taylor base squared 5 times: within 2.5e-4 of e^z on the clipped range
    (SPU's own exp, (1 + z/2^8)^(2^8), within 1.1e-3), 2^-32 at the fill value; the softmax
    drops what the clip drops and what the mask masks."""
    z = jnp.linspace(nonlinear.EXP_CLIP, 0.0, 28001)
    assert float(jnp.abs(nonlinear.exp_clipped_taylor(z) - jnp.exp(z)).max()) < 2.5e-4
    assert float(nonlinear.exp_clipped_taylor(jnp.asarray(nonlinear.EXP_TAYLOR_FILL))) < 1e-9
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, (4, 10)), jnp.float32)
    x = x.at[0, 2].set(x[0].max() - 40.0)                                 # below the clip
    mask = jnp.arange(10) < 7
    p = nonlinear.softmax_taylor(x, mask)
    np.testing.assert_allclose(p, nonlinear.softmax_exact(x, mask), atol=1e-3)
    assert float(jnp.abs(p[:, 7:]).max()) < 1e-9 and float(p[0, 2]) < 1e-9
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("protocol", ["aby3", "semi2k", "cheetah"])
def test_split_silu_and_poly_softmax_under_spu_equal_plaintext(protocol):
    """The variants compiled for SPU (FM64) give the plaintext values within fixed-point
    error, on activations that cross both of SiLU's comparisons and scores that cross the
    softmax clip; the exact softmax (the default: no clip) too, with entries down to 480
    below the row max, inside the domain of SPU's exp (1 + z/256)^256 (z >= -490)."""
    from protocols.registry import get_protocol
    from protocols.session import SpuSession

    rng = np.random.default_rng(1)
    act = np.concatenate([np.linspace(-12, 12, 49), [-300.0, 0.0, 300.0]]).astype(np.float32)
    scores = rng.normal(0, 6, (2, 12)).astype(np.float32)
    mask = np.arange(12) < 10
    scores[0, 3], scores[1, 5] = scores.max() - 20.0, scores.max() - 300.0   # far below clip
    scores[0, 7] = scores.max() - 480.0
    fn = lambda a, s: (nonlinear.silu_split(a), nonlinear.softmax_poly(s, mask),  # noqa: E731
                       nonlinear.softmax_clipped(s, mask), nonlinear.softmax_taylor(s, mask),
                       *nonlinear.softmax_exact(s, mask, normalise=False))
    session = SpuSession(get_protocol(protocol))
    prog = session.compile(fn, (act, scores), ("act", "scores"))
    session.put("act", act, owner=0)
    session.put("scores", scores, owner=1)
    outs, _ = session.run(prog, ("silu", "probs", "clipped", "taylor", "p", "recip"))
    silu, probs, clipped, taylor, p, recip = (np.asarray(session.reveal(o)) for o in outs)
    want = nonlinear.softmax_exact(scores, mask, normalise=False)
    np.testing.assert_allclose(p, np.asarray(want.p), atol=2e-3)   # SPU's exp: ~1e-3 off
    np.testing.assert_allclose(p * recip, np.asarray(want.p * want.recip), atol=5e-3)
    assert np.abs(p[:, 10:]).max() < 1e-5      # masked (SPU's exp overflows there: times 0)
    assert abs(p[0, 7]) < 1e-5 and abs(p[1, 5]) < 1e-5
    np.testing.assert_allclose(taylor, np.asarray(nonlinear.softmax_taylor(scores, mask)),
                               atol=2e-3)
    assert np.abs(taylor[:, 10:]).max() < 1e-5
    np.testing.assert_allclose(silu, np.asarray(nonlinear.silu_split(act)), atol=2e-3)
    np.testing.assert_allclose(probs, np.asarray(nonlinear.softmax_poly(scores, mask)),
                               atol=2e-3)
    assert np.all(probs[:, 10:] == 0.0)
    # the clipped softmax's entries below the clip enter SPU's exp at -2^8, where its
    # Taylor form is 0: they and the masked entries weigh nothing, on SPU as in plaintext
    plain = np.asarray(nonlinear.softmax_clipped(scores, mask))
    np.testing.assert_allclose(clipped, plain, atol=5e-3)
    below = np.asarray(scores - scores[:, :10].max(-1, keepdims=True) <= nonlinear.EXP_CLIP)
    assert below[0, 3] and below[1, 5] and np.all(plain[below] == 0.0)
    assert np.abs(clipped[below]).max() < 1e-5 and np.abs(clipped[:, 10:]).max() < 1e-5
    assert np.abs(taylor[below]).max() < 1e-5


def test_nonlinear_cost_script_measures_variants(tmp_path, capsys):
    """The cost script on the tiny model under ABY3: the split SiLU's gated block sends fewer
    bytes than the exact one (no reciprocal), rows carry the plaintext error, files land."""
    import json

    from experiments import nonlinear_cost

    nonlinear_cost.main(["--model", "tiny", "--seq", "128", "--protocols", "aby3",
                         "--variants", "silu=exact|split,softmax=clipped", "--block-cache", "",
                         "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by = {(r["field"], r["variant"]): r for r in rows}
    assert by[("silu", "split")]["bytes"] < 0.7 * by[("silu", "exact")]["bytes"]
    assert by[("silu", "split")]["default"] and by[("silu", "split")]["bytes_vs_default"] == 1.0
    assert by[("silu", "exact")]["plaintext_max_error"] == 0.0
    assert 0 < by[("silu", "split")]["plaintext_max_error"] < 7e-4
    assert by[("softmax", "clipped")]["count_per_step"] == preset("tiny").n_layers
    assert "| aby3 | silu | split (default) |" in capsys.readouterr().out
    assert by[("silu", "split")]["refill_sends"] == 0  # ABY3 has no silent OT


def test_nonlinear_cost_softmax_parts_and_exp_squarings(tmp_path):
    """The clipped softmax's pieces, measured alone on its block, add up to it (within the
    pieces' own overheads); SPU's exp with 4 squarings sends fewer bytes than with 8, and
    its error column is the Taylor form's."""
    import json

    from experiments import nonlinear_cost

    nonlinear_cost.main(["--model", "tiny", "--seq", "128", "--protocols", "aby3,aby3:exp_iters=4",
                         "--variants", "softmax_part=max|clip|exp|normalise", "--block-cache",
                         "", "--out", str(tmp_path / "parts")])
    nonlinear_cost.main(["--model", "tiny", "--seq", "128", "--protocols", "aby3",
                         "--variants", "softmax=clipped", "--block-cache", "",
                         "--out", str(tmp_path / "whole")])
    parts = json.loads((tmp_path / "parts" / "results.json").read_text())["rows"]
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["rows"][0]
    by = {(r["protocol"], r["variant"]): r for r in parts}
    default = sum(r["bytes"] for r in parts if r["protocol"] == "aby3")
    assert 0.9 < default / whole["bytes"] < 1.1
    fewer = by[("aby3 (exp 4 squarings)", "exp")]
    assert fewer["bytes"] < 0.7 * by[("aby3", "exp")]["bytes"]
    assert fewer["plaintext_max_error"] > 10 * by[("aby3", "exp")]["plaintext_max_error"] > 0
    with pytest.raises(ConfigError, match="softmax_part variants only"):
        nonlinear_cost.main(["--model", "tiny", "--protocols", "aby3:exp_iters=6",
                             "--variants", "softmax=clipped", "--block-cache", ""])
    with pytest.raises(ConfigError, match="unknown option"):
        nonlinear_cost.protocol_of("aby3:exp_iters=x")


def test_nonlinear_cost_rejects_unknown_variants():
    from experiments import nonlinear_cost

    with pytest.raises(ConfigError, match="unknown silu 'gelu'"):
        nonlinear_cost.parse_variants("silu=gelu")
    with pytest.raises(ConfigError, match="unknown field"):
        nonlinear_cost.parse_variants("swish=exact")
