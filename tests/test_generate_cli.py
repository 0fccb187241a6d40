"""generate.py as a user runs it: plaintext vs SPU on an unseen checkpoint, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "experiments" / "generate.py")


def assert_one_error_line(result, message=""):
    """Exit code 2, no traceback, exactly one `error:` line (the last), naming the problem.
    result: (exit code, stdout, stderr), as the `cli` fixture returns."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and message in errors[0], err


def run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(7)
    cfg = HFConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                   max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits so greedy choices are well separated
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_plain_and_spu_match_transformers(hf_dir, tmp_path, cli):
    """The plaintext run as its own process (the script as a user starts it), the SPU run
    in-process (the same main)."""
    from experiments.generate import main

    path, model = hf_dir
    prompt = [1, 7, 3, 9, 4]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for backend in ("plain", "spu"):
        out = tmp_path / f"{backend}.json"
        args = ["--model", str(path), "--prompt-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", "5", "--backend", backend, "--protocol", "semi2k",
                "--json", str(out)]
        if backend == "plain":
            r = run(*args)
            assert r.returncode == 0, r.stderr
        else:
            code, _, err = cli(main, *args)
            assert code == 0, err
        data = json.loads(out.read_text())
        assert data["tokens"] == ref
        assert data["backend"] == backend
    cost = data["cost"]
    assert data["protocol"] == "semi2k" and data["matches_plain"] is True
    assert len(cost["bytes_sent"]) == 2 and all(b > 0 for b in cost["bytes_sent"])
    assert len(cost["sends"]) == 2 and cost["seconds"] > 0
    assert len(cost["decode_steps"]) == 4


@pytest.mark.parametrize("args,message", [
    (["--protocol", "spdz", "--backend", "spu"], "unknown protocol"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--backend", "spu", "--field", "FM32"], "unknown field"),
    (["--backend", "spu", "--fxp-bits", "40"], "fxp_fraction_bits"),
    (["--backend", "gpu"], "unknown backend"),
    (["--prompt-ids", "1,x,3"], "comma-separated"),
    (["--prompt-ids", "1,99999"], "out of range"),
    (["--prompt-ids", ",".join(["1"] * 70)], "exceed the model context"),
])
def test_bad_input_one_line_exit_2(hf_dir, args, message, tmp_path, cli):
    from experiments.generate import main

    path, _ = hf_dir
    base = ["--model", str(path)] + ([] if "--prompt-ids" in args else ["--prompt-ids", "1,2"])
    out = tmp_path / "r.json"
    assert_one_error_line(cli(main, *base, *args, "--json", out), message)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "corrupt_gguf", "corrupt_safetensors", "bad_arch"])
def test_bad_checkpoints_one_line_exit_2(kind, tmp_path, hf_dir, cli):
    from experiments.generate import main

    if kind == "missing":
        target = tmp_path / "nope"
    elif kind == "corrupt_gguf":
        target = tmp_path / "m.gguf"
        target.write_bytes(b"GGUF" + os.urandom(64))
    elif kind == "corrupt_safetensors":
        target = tmp_path / "d"
        target.mkdir()
        (target / "config.json").write_text((hf_dir[0] / "config.json").read_text())
        (target / "model.safetensors").write_bytes(os.urandom(100))
    else:
        target = tmp_path / "d"
        target.mkdir()
        cfg = json.loads((hf_dir[0] / "config.json").read_text())
        cfg["model_type"] = "gpt_neox"
        (target / "config.json").write_text(json.dumps(cfg))
    assert_one_error_line(cli(main, "--model", target, "--prompt-ids", "1,2"))


def test_policy_flags_plain_and_spu_agree(hf_dir, tmp_path, cli):
    from experiments.generate import main

    path, _ = hf_dir
    prompt = ",".join(str(i % 50) for i in range(3, 43))  # 40 tokens
    runs = {}
    for backend in ("plain", "spu"):
        out = tmp_path / f"{backend}.json"
        code, _, err = cli(main, "--model", path, "--prompt-ids", prompt, "--max-new-tokens",
                           "4", "--backend", backend, "--policy", "mpcache", "--budget", "0.5",
                           "--static-ratio", "0.5", "--window", "8", "--json", out)
        assert code == 0, err
        runs[backend] = json.loads(out.read_text())
    assert runs["spu"]["tokens"] == runs["plain"]["tokens"]
    for data in runs.values():
        assert data["policy"] == "mpcache" and data["policy_settings"]["window"] == 8
        assert data["policy_settings"]["static_ratio"] == 0.5   # evicts at prefill: < 1
        assert 0 < data["attended_fraction"] < 1


def test_policy_spec_with_setting_flags():
    """--policy takes a spec as run_accuracy does; the setting flags add to it."""
    from experiments.generate import build_parser, policy_from_args
    from mpc_llama.errors import ConfigError

    def policy(*argv):
        return policy_from_args(build_parser().parse_args(["--prompt", "x", *argv]))

    p = policy("--policy", "mpcache:warmup=16", "--budget", "0.2")
    assert (p.name, p.warmup, p.budget) == ("mpcache", 16, 0.2)
    p = policy("--policy", "snapkv:kernel=1", "--window", "8")
    assert (p.kernel, p.window) == (1, 8)
    with pytest.raises(ConfigError, match="bogus"):
        policy("--policy", "mpcache:bogus=1")
