"""Reads Hugging Face LLaMA-family directories (config.json + *.safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import numpy as np

from mpc_llama.config import LlamaConfig, RopeScaling
from mpc_llama.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama",)


def config_from_hf(hf: dict) -> LlamaConfig:
    """Maps a transformers LlamaConfig dict to ours, rejecting what we do not implement."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"unsupported config field {flag}=true")
    rope_scaling = None
    rs = hf.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"unsupported rope_scaling type {kind!r}: only llama3")
        rope_scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                   float(rs["high_freq_factor"]),
                                   int(rs["original_max_position_embeddings"]))
    n_heads = int(hf["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        ffn_dim=int(hf["intermediate_size"]), rope_base=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)))


def _read_tensors(directory: Path) -> dict:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"corrupt {index}: {e}") from None
        files = [directory / s for s in shards]
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    tensors = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"missing checkpoint shard {f}")
        try:
            # The flax backend reads bfloat16, which numpy cannot.
            with safe_open(str(f), framework="flax") as fh:
                for name in fh.keys():
                    tensors[name] = np.asarray(fh.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return tensors


_LAYER_TENSORS = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj",
                  "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
                  "mlp_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj",
                  "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


def load_hf(directory: Path) -> Tuple[LlamaConfig, dict]:
    """Returns (config, float32 params) from a transformers checkpoint directory."""
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"corrupt {cfg_path}: {e}") from None
    cfg = config_from_hf(hf)
    tensors = _read_tensors(directory)

    def get(name):
        if name not in tensors:
            raise CheckpointError(f"checkpoint in {directory} lacks tensor {name!r}")
        return tensors[name]

    layers = {k: [] for k in _LAYER_TENSORS}
    for i in range(cfg.n_layers):
        for key, short in _LAYER_TENSORS.items():
            w = get(f"model.layers.{i}.{short}.weight")
            layers[key].append(w if w.ndim == 1 else w.T)  # torch Linear is [out, in]
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
              "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return cfg, params
