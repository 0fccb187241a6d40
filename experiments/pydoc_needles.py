"""Needles in natural prose that is not ours: Python's own documentation.

    python experiments/pydoc_needles.py --length 2048 --seeds 100-119 \
        --policies mpcache,mpcache:warmup=8,oracle --out runs/pydoc_2k

The haystack is the English prose of the standard library's `pydoc_data.topics` (the
Python reference's topics, shipped with every Python: offline, not written for this project).
A needle sentence ("Remember this detail: the ferry ticket number that Rafael wrote on the
envelope is 39027.") sits at a random depth; the question, asked with SmolLM2's chat
template, is long enough that the model restates it before answering ("The ferry ticket
number that Rafael wrote on the envelope is ..."), so the code comes ~12 tokens into the
answer: a check of a kept selection's schedule that the harness's tasks (answers first) do
not make. Each seed draws name, object, code, paragraphs and depth; prompts are cut to exactly
--length tokens (the body is trimmed, never the needle), so they decode in batches through
run_accuracy's evaluator, every policy on the same prompt pass. Score: the code appears in the
greedy output (24 new tokens).

Outputs (--out): results.json (per sample and policy: the output and whether it holds the
code; the score per policy; the command), written atomically.
"""

from __future__ import annotations

import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402

NAMES = ("Margaret", "Tobias", "Ingrid", "Rafael", "Yuki", "Desmond")
THINGS = ("locker combination", "wifi password digits", "ferry ticket number",
          "museum badge code")
NEW_TOKENS = 24


def paragraphs():
    """The reference's prose paragraphs (over 200 characters, whitespace folded)."""
    import pydoc_data.topics as topics

    text = " \n\n".join(topics.topics.values())
    paras = (re.sub(r"\s+", " ", p.strip()) for p in re.split(r"\n\s*\n", text))
    return [p for p in paras if len(p) > 200]


def sample(tokenizer, paras, seed: int, length: int):
    """One prompt of exactly `length` tokens (chat template included) with its needle."""
    from experiments.tasks import Sample

    rng = random.Random(1000 + seed)
    name, thing, code = rng.choice(NAMES), rng.choice(THINGS), str(rng.randint(10000, 99999))
    needle = f"Remember this detail: the {thing} that {name} wrote on the envelope is {code}."
    question = f"What is the {thing} that {name} wrote on the envelope? Reply with the number only."
    start, body, n = rng.randrange(len(paras)), [], 0
    while n < length:
        p = paras[(start + len(body)) % len(paras)]
        body.append(p)
        n += len(tokenizer.hf.encode(p, add_special_tokens=False))
    body.insert(int(rng.uniform(0.1, 0.9) * len(body)), needle)
    ids = tokenizer.chat("Read the following text.\n\n" + "\n\n".join(body) + "\n\n" + question)
    nid = tokenizer.hf.encode(needle, add_special_tokens=False)
    pos = next(i for i in range(len(ids)) if ids[i:i + 5] == nid[:5])
    # trim the body just before the question (its tokens and the template's tail stay)
    keep_tail = len(tokenizer.hf.encode("\n\n" + question, add_special_tokens=False)) + 12
    cut = len(ids) - length
    stop = len(ids) - keep_tail - cut
    if pos + len(nid) >= stop:
        raise ConfigError(f"--seeds {seed}: its needle falls in the text cut to --length "
                          f"{length}; leave that seed out")
    ids = ids[:stop] + ids[stop + cut:]
    return Sample(f"pydoc{seed}", tuple(ids), tuple(ids), (), (code,),
                  ((pos, pos + len(nid)),), pos / length, NEW_TOKENS)


def _seeds(text: str):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise ConfigError(f"--seeds: cannot parse {text!r}") from None
    return out


def main(argv=None):
    from tqdm import tqdm

    from eviction import policy_from_spec
    from experiments import run_accuracy
    from mpc_llama.loading import load_model

    p = Parser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or HF directory")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--seeds", default="100-119", help="e.g. 100-119 or 1,2,5")
    p.add_argument("--policies", default="mpcache,oracle", help="comma list of policy specs "
                   "(full always runs)")
    p.add_argument("--budget", type=float, default=0.1, help="attended fraction")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    p.add_argument("--out", help="directory for results.json")
    args = p.parse_args(argv)
    seeds = _seeds(args.seeds)
    if args.length < 256:
        raise ConfigError("--length must be >= 256")
    if not 0.0 < args.budget <= 1.0 or args.batch < 1 or not seeds:
        raise ConfigError("--budget must be in (0, 1], --batch >= 1, --seeds not empty")
    policies = {("full", 1.0): None}
    for spec in [s for s in args.policies.split(",") if s.strip() and s.strip() != "full"]:
        policies[(spec.strip(), args.budget)] = policy_from_spec(spec.strip(), args.budget)
    model = load_model(args.model)
    tok = model.tokenizer
    if args.length + NEW_TOKENS + 1 > model.cfg.max_seq_len:
        raise ConfigError(f"--length {args.length} leaves no room for the answer in the "
                          f"model's {model.cfg.max_seq_len} tokens")
    paras = paragraphs()
    samples = [sample(tok, paras, s, args.length) for s in seeds]
    ev, eos = run_accuracy.Evaluator(model, 64), set(tok.eos_ids)
    records = []
    for i in tqdm(range(0, len(samples), args.batch), desc="batches", file=sys.stderr):
        batch = samples[i:i + args.batch]
        res, _, _ = run_accuracy.evaluate_batch(ev, batch, "inside", policies, eos, tok)
        for s, r in zip(batch, res):
            for (name, _), v in r.items():
                records.append({"sample": s.task, "code": s.answers[0], "depth": s.depth,
                                "policy": name, "output": v["output"],
                                "found": s.answers[0] in v["output"]})
    score = {name: sum(r["found"] for r in records if r["policy"] == name) / len(samples)
             for name, _ in policies}
    for name, v in score.items():
        print(f"{name:<28} {v:.2f} ({round(v * len(samples))}/{len(samples)})")
    if args.out:
        write_json_atomic(os.path.join(args.out, "results.json"), {
            "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
            "length": args.length, "budget": args.budget, "seeds": seeds, "score": score,
            "samples": records})
        print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    run_main(main)
