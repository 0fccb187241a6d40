"""Reads LLaMA-architecture GGUF files (llama.cpp) into our config and parameter pytree."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from mpc_llama.config import LlamaConfig
from mpc_llama.errors import CheckpointError


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"GGUF file lacks required metadata {key!r}")
        return default
    return field.contents()


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE -> rotate-half).

    w: [n_heads * head_dim, d_in] in the file's row order.
    """
    out_dim, d_in = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(out_dim, d_in)


def read_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    p = "llama."
    n_heads = int(_field(reader, p + "attention.head_count"))
    d_model = int(_field(reader, p + "embedding_length"))
    if reader.fields.get(p + "rope.scaling.type") is not None:
        raise CheckpointError("GGUF RoPE scaling metadata is not supported")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, p + "vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=int(_field(reader, p + "block_count")),
        n_heads=n_heads, n_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", d_model // n_heads)),
        ffn_dim=int(_field(reader, p + "feed_forward_length")),
        rope_base=float(_field(reader, p + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(_field(reader, p + "context_length")))


_LAYER_TENSORS = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                  "wo": "attn_output", "mlp_norm": "ffn_norm", "w_gate": "ffn_gate",
                  "w_up": "ffn_up", "w_down": "ffn_down"}


def load_gguf(path: Path) -> Tuple[LlamaConfig, dict]:
    """Returns (config, float32 params) from a GGUF file, dequantizing every tensor."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises assorted errors on bad files
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None
    cfg = read_config(reader)
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in tensors:
            raise CheckpointError(f"GGUF file {path} lacks tensor {name!r}")
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize {name} ({t.tensor_type.name}): {e}") from None
        return np.asarray(w, np.float32).reshape([int(n) for n in reversed(t.shape)])

    layers = {k: [] for k in _LAYER_TENSORS}
    for i in range(cfg.n_layers):
        for key, short in _LAYER_TENSORS.items():
            w = get(f"blk.{i}.{short}.weight")
            if key == "wq":
                w = unpermute_qk(w, cfg.n_heads)
            elif key == "wk":
                w = unpermute_qk(w, cfg.n_kv_heads)
            layers[key].append(w if w.ndim == 1 else w.T)  # file rows are outputs
    params = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight"),
              "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("output.weight").T
    return cfg, params
