r"""Greedy generation with any loaded model, in plaintext or with every step under MPC.

    python experiments/generate.py --model smollm2 --prompt "What is the capital of France?" --chat
    python experiments/generate.py --model smollm2 --prompt "The capital of France is" \
        --max-new-tokens 4 --backend spu --protocol semi2k --json runs/gen.json
    python experiments/generate.py --model path/to/hf_dir --prompt-ids 1,2,3 --backend spu
    python experiments/generate.py --prompt-ids 1,2,3,... --policy mpcache --budget 0.1 \
        --backend spu --protocol aby3
    python experiments/generate.py --prompt "Hi" --parties parties.json --protocol cheetah

With --parties (implies --backend spu) every party is its own process on SPU's brpc link
(protocols/party.py): this process is the data owner (it holds the prompt and reads only the
tokenizer and architecture); the model owner reads the weights; parties with loopback
addresses are started here, others must be running `python -m protocols.party`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402
from mpc_llama.errors import ConfigError, MpcacheError  # noqa: E402


def parse_ids(text: str):
    try:
        ids = [int(t) for t in text.split(",") if t.strip() != ""]
    except ValueError:
        raise ConfigError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ConfigError("--prompt-ids is empty")
    return ids


def build_parser() -> Parser:
    p = Parser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a .gguf file or an "
                   "HF checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--backend", default="plain", help="plain or spu")
    p.add_argument("--protocol", default="semi2k", help="semi2k, cheetah or aby3 (spu backend)")
    p.add_argument("--field", default="FM64", help="SPU ring: FM64 or FM128")
    p.add_argument("--fxp-bits", type=int, default=0,
                   help="fixed-point fraction bits (0: SPU default, 18 for FM64, 26 for FM128)")
    p.add_argument("--no-beaver-cache", action="store_true",
                   help="semi2k: open the weights and KV rows at every use (no Beaver cache)")
    p.add_argument("--no-check", action="store_true",
                   help="with --backend spu, skip the plaintext run that checks the tokens")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--parties", help="parties file (JSON): run each party as its own process "
                   "over brpc instead of the in-process simulator (see protocols/parties.py)")
    p.add_argument("--party-logs", help="directory for the logs of locally started parties")
    p.add_argument("--no-spawn", action="store_true",
                   help="start no parties here: all are already running protocols.party")
    e = p.add_argument_group("KV-cache eviction")
    e.add_argument("--policy", default="full",
                   help="full, streaming_llm, h2o, snapkv, tova, quest, mpcache, "
                        "mpcache_published, mpcache_static, oracle; settings as "
                        "name:field=value[:field=value], e.g. mpcache:warmup=16")
    e.add_argument("--budget", type=float, default=0.1,
                   help="fraction of the prompt attended per KV head per decode step, sinks "
                        "and windows included (ignored by full)")
    e.add_argument("--static-ratio", type=float, help="mpcache: fraction kept at prefill "
                   "(default max(0.5, 2*budget))")
    e.add_argument("--window", type=int, help="mpcache/snapkv: observation-window queries")
    e.add_argument("--kernel", type=int, help="mpcache/snapkv: max-pooling kernel (1 = none)")
    e.add_argument("--aggregate", help="mpcache: sum or max over the window")
    e.add_argument("--alpha", type=float, help="mpcache: similarity weight of r_max")
    e.add_argument("--share", help="mpcache: layer sharing pattern, pairs or none")
    return p


def policy_from_args(args):
    """--policy as a name or a spec ("mpcache:warmup=16", as run_accuracy takes), with the
    setting flags on top."""
    from eviction import policy_from_spec

    fields = [f"{k}={getattr(args, k)}" for k in ("static_ratio", "window", "kernel",
                                                   "aggregate", "alpha", "share")
              if getattr(args, k) is not None]
    return policy_from_spec(":".join([args.policy] + fields), args.budget)


def _cost_json(res, total, setup, protocol) -> dict:
    return {
        **total.to_json(),
        "what": "prefill + all decode steps, steady state; setup reported separately",
        "parties": protocol.world_size, "beaver_cache": protocol.beaver_cache,
        "setup": setup.to_json() if protocol.kind == "CHEETAH" else None,
        "prefill": res.prefill_cost.to_json(),
        "decode_steps": [{k: v for k, v in c.to_json().items() if k != "ops"}
                         for c in res.decode_costs],
    }


def main() -> None:
    args = build_parser().parse_args()
    from protocols.registry import get_protocol

    if args.parties:
        args.backend = "spu"
    if args.backend not in ("plain", "spu"):
        raise ConfigError(f"unknown backend {args.backend!r}; choose plain or spu")
    protocol = get_protocol(args.protocol).with_numerics(args.field, args.fxp_bits) \
        if args.backend == "spu" else None
    if protocol is not None and args.no_beaver_cache:
        protocol = protocol.without_beaver_cache()
    if args.parties:  # bad files fail before anything is loaded or started
        from protocols.parties import load_parties

        load_parties(args.parties).check_world(protocol.world_size, protocol.name)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.chat and args.prompt is None:
        raise ConfigError("--chat needs --prompt TEXT")
    prompt_ids = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    policy = policy_from_args(args)

    from tqdm import tqdm

    from mpc_llama.loading import load_model

    print(f"loading {args.model} ...", file=sys.stderr)
    if args.parties:  # the user holds no weights: architecture and tokenizer only
        from mpc_llama.loading import LoadedModel, load_config, load_tokenizer

        model = LoadedModel(load_config(args.model), None, load_tokenizer(args.model),
                            args.model)
    else:
        model = load_model(args.model)
    tok = model.tokenizer
    if prompt_ids is None:
        if tok is None:
            raise MpcacheError(f"{args.model} has no tokenizer; give --prompt-ids")
        prompt_ids = tok.chat(args.prompt) if args.chat else tok.encode(args.prompt)
    bad = [i for i in prompt_ids if not 0 <= i < model.cfg.vocab_size]
    if bad:
        raise ConfigError(f"token ids out of range [0, {model.cfg.vocab_size}): {bad[:5]}")
    from mpc_llama.generation import check_lengths

    check_lengths(model.cfg, len(prompt_ids), args.max_new_tokens)
    eos = tok.eos_ids if tok else ()
    bar = tqdm(total=args.max_new_tokens, desc=f"generate ({args.backend})", unit="tok",
               file=sys.stderr)
    start = time.perf_counter()
    result = {"model": model.source, "backend": args.backend, "prompt_ids": prompt_ids,
              "protocol": protocol.name if protocol else None,
              "field": protocol.field if protocol else None,
              "fxp_fraction_bits": protocol.fxp_fraction_bits if protocol else None,
              "policy": args.policy, "policy_settings": dataclasses.asdict(policy),
              "budget": policy.budget}
    if protocol is None:
        from mpc_llama.generation import greedy_generate

        gen = greedy_generate(model.params, model.cfg, prompt_ids, args.max_new_tokens, eos,
                              on_token=lambda t: bar.update(1), policy=policy)
        tokens, result["attended_fraction"] = gen.tokens, gen.attended_fraction
    elif args.parties:
        from protocols.party import Cluster

        with Cluster(args.parties, args.model, start_local=not args.no_spawn,
                     log_dir=args.party_logs) as cluster:
            setup = cluster.warm_up(protocol) if protocol.kind == "CHEETAH" else None
            res = cluster.generate(protocol, model.cfg, policy, prompt_ids,
                                   args.max_new_tokens, eos)
        bar.update(len(res.tokens))
        tokens, total = res.tokens, res.total
        result["parties"] = list(cluster.parties.addresses)
        result["cost"] = _cost_json(res, total, setup, protocol)
        result["cost"]["what"] += "; real parties over brpc (seconds: slowest party)"
    else:
        from protocols.private_generation import generate_all_parties

        res, setup = generate_all_parties(protocol, model.cfg, model.params, prompt_ids,
                                          args.max_new_tokens, eos, policy,
                                          on_token=lambda t, c: bar.update(1))
        tokens, total = res.tokens, res.total
        result["cost"] = _cost_json(res, total, setup, protocol)
    bar.close()
    result["seconds"] = time.perf_counter() - start
    if args.parties and not args.no_check:
        print("plaintext check skipped: with --parties this process (the user) holds no "
              "weights", file=sys.stderr)
    elif protocol is not None and not args.no_check:
        from mpc_llama.generation import greedy_generate

        check = greedy_generate(model.params, model.cfg, prompt_ids, args.max_new_tokens, eos,
                                policy=policy)
        plain = check.tokens
        # sizes are public, so the plaintext run attends exactly as many entries as SPU did
        result["attended_fraction"] = check.attended_fraction
        result["plain_tokens"] = plain
        result["matches_plain"] = plain == tokens
        print(f"private tokens {'EQUAL' if plain == tokens else 'DIFFER FROM'} plaintext "
              f"{plain}", file=sys.stderr)
    result["tokens"] = tokens
    result["text"] = tok.decode(tokens) if tok else None
    print(result["text"] if tok else ",".join(map(str, tokens)))
    if "cost" in result:
        c = result["cost"]
        print(f"[{protocol.name}] bytes sent per party {c['bytes_sent']}, sends {c['sends']}, "
              f"{c['seconds']:.1f} s compute", file=sys.stderr)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    run_main(main)
