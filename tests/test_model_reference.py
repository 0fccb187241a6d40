"""Our model against transformers' LlamaForCausalLM, from a saved checkpoint and directly."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import jax.numpy as jnp

from conftest import assert_close
from mpc_llama.hf_loader import load_hf
from mpc_llama.model import prefill

CASES = {
    "gqa_untied_base500": dict(vocab_size=97, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               rope_theta=500.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "mha_tied_headdim": dict(vocab_size=61, hidden_size=24, intermediate_size=40,
                             num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                             head_dim=16, rope_theta=10000.0, tie_word_embeddings=True),
    "llama3_rope_scaling": dict(vocab_size=50, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}),
}


def _reference(case, tmp_path, seed=0):
    torch.manual_seed(seed)
    hf_cfg = HFConfig(max_position_embeddings=256, **CASES[case])
    ref = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    ref = _reference(case, tmp_path)
    tokens = np.random.default_rng(0).integers(0, CASES[case]["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    cfg, params = load_hf(tmp_path)
    cfg = cfg.replace(softmax="exact", silu="exact")
    logits, _ = prefill(params, cfg, jnp.asarray(tokens), capacity=40)
    assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_direct_weights_match_transformers():
    """Without a checkpoint file: map the torch state dict in memory through the same config."""
    from mpc_llama.hf_loader import config_from_hf

    torch.manual_seed(3)
    hf_cfg = HFConfig(max_position_embeddings=64, **CASES["gqa_untied_base500"])
    ref = LlamaForCausalLM(hf_cfg).eval()
    cfg = config_from_hf(hf_cfg.to_dict()).replace(softmax="exact", silu="exact")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "mlp_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj",
             "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    layers = {ours: np.stack([sd[f"model.layers.{i}.{theirs}.weight"].T
                              for i in range(cfg.n_layers)]) for ours, theirs in names.items()}
    params = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
              "lm_head": sd["lm_head.weight"].T, "layers": layers}
    tokens = np.arange(30).reshape(1, 30) % cfg.vocab_size
    with torch.no_grad():
        expected = ref(torch.tensor(tokens)).logits.numpy()
    logits, _ = prefill(params, cfg, jnp.asarray(tokens), capacity=30)
    assert_close(logits, expected)
