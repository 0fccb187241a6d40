"""Plaintext speed of the accuracy harness's paths: prompt pass and decode step per policy.

    python experiments/decode_speed.py --length 8192 --policies full,mpcache,snapkv,quest

One prompt pass of `--length` tokens (a real passkey prompt, chunked attention, timed after a
jit warm-up run), then for each policy its cache is built from that pass and `--steps` greedy
decode steps are timed after `--warmup` untimed ones (compilation), with the per-layer jitted
decode step of experiments/run_accuracy.py. Prints seconds and writes --json if given.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or HF directory")
    p.add_argument("--length", type=int, default=8192, help="prompt tokens in the cache")
    p.add_argument("--policies", default="full,mpcache", help="comma list of policies")
    p.add_argument("--budget", type=float, default=0.1, help="attended fraction of the prompt")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (jit)")
    p.add_argument("--chunk", type=int, default=64, help="prefill attention chunk (queries)")
    p.add_argument("--json", help="write the timings here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise ConfigError("--steps and --warmup must be >= 1")
    import numpy as np
    from tqdm import tqdm

    from eviction import policy_from_spec
    from experiments.run_accuracy import Evaluator
    from experiments.tasks import generate
    from mpc_llama.loading import load_config, load_model

    cfg = load_config(args.model)
    if not 128 <= args.length <= cfg.max_seq_len - args.steps - args.warmup - 1:
        raise ConfigError(f"--length must be in [128, {cfg.max_seq_len - 64}]")
    policies = {n: None if n == "full" else policy_from_spec(n, args.budget)
                for n in args.policies.split(",") if n}
    model = load_model(args.model)
    ev = Evaluator(model, args.chunk)
    sample = generate("passkey", model.tokenizer, args.length, 0.5, 0)
    ids = list(sample.prompt_ids)
    times = []
    for _ in tqdm(range(2), desc="prompt pass (1st compiles)", file=sys.stderr):
        t0 = time.perf_counter()
        logits, layers = ev.prompt([ids])  # a batch of one row
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    out = {"length": len(ids), "prefill_s_first": times[0], "prefill_s": times[1],
           "steps": args.steps, "policies": {}}
    print(f"prompt pass of {len(ids)} tokens: {times[1]:.1f} s ({times[0]:.1f} s with jit)")
    for name, policy in tqdm(policies.items(), desc="policies", file=sys.stderr):
        cache = ev.cache(layers, len(ids) + args.steps + args.warmup + 1, policy)
        tok, pos, step_s = int(np.argmax(np.asarray(logits)[0])), len(ids), []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            z, cache, _ = ev.step([tok], pos, cache, policy, len(ids))
            z.block_until_ready()
            if i >= args.warmup:
                step_s.append(time.perf_counter() - t0)
            tok, pos = int(np.argmax(np.asarray(z)[0])), pos + 1
        med = float(np.median(step_s))
        out["policies"][name] = {"decode_s_per_token": med, "all": step_s}
        print(f"{name:<24} {med * 1000:8.1f} ms per decode step (median of {args.steps})")
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    run_main(main)
