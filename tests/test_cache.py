"""Cached decoding equals full recomputation; the cache records original positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from mpc_llama.generation import greedy_generate
from mpc_llama.model import decode_step, prefill, run_prompt, split_layers


def test_cached_decoding_equals_full_recomputation(tiny):
    cfg, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    full, _ = prefill(params, cfg, tokens, capacity=12)
    _, cache = prefill(params, cfg, tokens[:, :7], capacity=12)
    for t in range(7, 12):
        logits, cache = decode_step(params, cfg, tokens[:, t], t, cache)
        assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)
    assert int(cache.length) == 12
    np.testing.assert_array_equal(np.asarray(cache.pos[0, 0, 0]), np.arange(12))


def test_cache_positions_mark_empty_entries(tiny):
    cfg, params = tiny
    _, cache = prefill(params, cfg, jnp.ones((1, 3), jnp.int32), capacity=5)
    np.testing.assert_array_equal(np.asarray(cache.pos[1, 0, 1]), [0, 1, 2, -1, -1])
    assert cache.k.shape == (cfg.n_layers, 1, cfg.n_kv_heads, 5, cfg.head_dim)


def test_greedy_generate_matches_argmax_of_full_forward(tiny):
    cfg, params = tiny
    prompt = [3, 5, 7, 11]
    out = greedy_generate(params, cfg, prompt, 4).tokens
    seq = list(prompt)
    for _ in range(4):
        logits, _ = prefill(params, cfg, jnp.asarray([seq]), capacity=len(seq))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]


def test_presets_have_real_shapes():
    """7B/8B shapes checked without allocating (jax.eval_shape)."""
    from mpc_llama.config import preset
    from mpc_llama.model import init_params

    for name, n_params in (("llama-2-7b", 6.74e9), ("llama-3.1-8b", 8.03e9),
                           ("smollm2-135m", 1.35e8)):
        cfg = preset(name)
        shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
        total = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
        assert abs(total - n_params) / n_params < 0.01, (name, total)


@pytest.mark.parametrize("softmax", ["exact", "clipped"])
@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_chunked_prefill_equals_masked_attention(tiny, softmax, chunk):
    """The plaintext speed path (attend_chunked, other layout, normalisation after p . V)
    gives the logits and per-layer q/k/v of the one-matrix causal prefill."""
    cfg, params = tiny
    cfg = cfg.replace(softmax=softmax)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 13)))
    x_ref, layers_ref = run_prompt(params, cfg, tokens)
    x, layers = run_prompt(params, cfg, tokens, chunk=chunk)
    assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(layers, layers_ref):
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layered_decode_equals_stacked(tiny):
    """decode_step on a per-layer cache and per-layer params with a per-layer jitted layer
    function (run_accuracy's fast path) gives the stacked whole-step results, for the full
    cache and a sharing, selecting policy."""
    from eviction import make_policy
    from experiments.run_accuracy import LayerJit, _unstack

    cfg, params = tiny
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 40)))
    split = split_layers(params, cfg.n_layers)
    for policy in (None, make_policy("mpcache", 0.3, s1=8, s2=4, share="pairs")):
        _, cache = prefill(params, cfg, tokens, capacity=44, policy=policy)
        layered = _unstack(cache)
        layer_fn = LayerJit()
        pos = 40
        for t in (3, 9, 11):
            logits, cache, diag = decode_step(params, cfg, jnp.asarray([t]), pos, cache, policy,
                                              40, diagnostics=True)
            got, layered, gdiag = decode_step(split, cfg, jnp.asarray([t]), pos, layered,
                                              policy, 40, diagnostics=True, layer_fn=layer_fn)
            assert_close(got, logits, rtol=1e-5, atol=1e-5)
            for name in ("counts", "attended_pos"):
                np.testing.assert_array_equal(np.asarray(gdiag[name]), np.asarray(diag[name]))
            assert_close(gdiag["attn_out"], diag["attn_out"], rtol=1e-5, atol=1e-5)
            pos += 1
        assert_close(jnp.stack(layered.k), cache.k, rtol=1e-5, atol=1e-5)
        assert int(layered.length) == int(cache.length)


@pytest.mark.parametrize("spec", ["snapkv", "h2o", "tova", "mpcache_static", "streaming_llm"])
def test_index_compaction_moves_the_same_entries_as_onehot(tiny, spec):
    """The accuracy harness's index gather is the one-hot compaction SPU runs, bit for bit."""
    from eviction import policy_from_spec
    from mpc_llama.model import build_cache

    cfg, params = tiny
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 40)),
                         jnp.int32)
    _, layers = run_prompt(params, cfg, tokens)
    policy = policy_from_spec(spec, 0.25)
    a = build_cache(cfg, layers, 48, policy)
    b = build_cache(cfg, layers, 48, policy, compaction="index")
    assert int(a.length) == int(b.length) < 40
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_onehot_embedding_in_pieces_equals_the_table_rows(tiny, monkeypatch):
    """A long prompt's one-hot embedding runs in pieces (SPU memory); values are unchanged."""
    from mpc_llama import model

    cfg, params = tiny
    cfg = cfg.replace(embedding="onehot")
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 50)))
    monkeypatch.setattr(model, "ONEHOT_CHUNK", cfg.vocab_size * 2 * 7)  # pieces of 7 tokens
    np.testing.assert_array_equal(np.asarray(model.embed(params, tokens, cfg)),
                                  np.asarray(params["embed"])[np.asarray(tokens)])


@pytest.mark.parametrize("tied", [False, True])
def test_folded_norm_weights_give_the_same_model(tiny, tied):
    """The model owner's offline fold (norm weights into the next matrices) leaves prefill and
    decode logits as they were; a tied head keeps its final norm's weight; the other parties'
    placeholders fold to the same tree and shapes; folding twice changes nothing."""
    from mpc_llama.model import fold_norm_weights, init_params
    from protocols.private_generation import placeholder_params

    cfg, _ = tiny
    cfg = cfg.replace(tie_embeddings=tied)
    params = init_params(cfg, jax.random.PRNGKey(3), scale=0.3)
    params["final_norm"] = 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(4),
                                                          params["final_norm"].shape)
    folded = fold_norm_weights(params)
    assert "attn_norm" not in folded["layers"] and "mlp_norm" not in folded["layers"]
    assert ("final_norm" in folded) == tied
    assert not np.allclose(folded["layers"]["wq"], params["layers"]["wq"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12)))
    want, cache = prefill(params, cfg, tokens, 14, last_only=True)
    got, fcache = prefill(folded, cfg, tokens, 14, last_only=True)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    token = jnp.argmax(want, -1).astype(jnp.int32)
    want, _ = decode_step(params, cfg, token, 12, cache)
    got, _ = decode_step(folded, cfg, token, 12, fcache)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    shapes = lambda p: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), p)  # noqa: E731
    assert shapes(fold_norm_weights(placeholder_params(cfg))) == shapes(folded)
    assert shapes(fold_norm_weights(folded)) == shapes(folded)
