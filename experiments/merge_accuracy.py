"""Merges run_accuracy.py results run as separate processes (e.g. one per task and length, in
parallel) into one results.json / results.csv / score.png, re-aggregated from the per-sample
records, so the merged table is exactly what one run over all of them would print.

    python experiments/merge_accuracy.py --out runs/acc runs/acc_passkey runs/acc_niah_single

Inputs must come from the same model; a (task, length, question, policy, budget, depth)
record present in two inputs is an error (the same sample counted twice).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402


def load(path):
    f = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(f) as fh:
            res = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"no results file at {f}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not JSON: {e}") from None
    if "samples" not in res or "rows" not in res:
        raise ConfigError(f"{f} is not a run_accuracy.py results file")
    return res


def merge(results):
    """One payload from several run_accuracy payloads (records concatenated, rows
    re-aggregated). Raises ConfigError on mixed models or a sample counted twice."""
    from experiments.run_accuracy import aggregate

    models = {r["model"] for r in results}
    if len(models) > 1:
        raise ConfigError(f"inputs come from different models: {sorted(models)}")
    seen, records = set(), []
    for res in results:
        for rec in res["samples"]:
            key = (rec["task"], rec["length"], rec["question"], rec["policy"], rec["budget"],
                   rec["depth"])
            if key in seen:
                raise ConfigError(f"sample {key} appears in more than one input")
            seen.add(key)
            records.append(rec)
    prefill = {}
    for res in results:
        for n, t in res.get("prefill", {}).items():
            prefill.setdefault(n, []).append(t)
    return {"command": [r["command"] for r in results], "model": models.pop(),
            "rows": aggregate(records), "samples": records, "prefill": prefill,
            "runs": [r.get("runs") for r in results],
            "platform": [r.get("platform") for r in results]}


def main(argv=None):
    from experiments.run_accuracy import print_summary, write_outputs

    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="run_accuracy.py output directories or files")
    p.add_argument("--out", required=True, help="directory for the merged outputs")
    args = p.parse_args(argv)
    payload = merge([load(path) for path in args.inputs])
    print_summary(payload["rows"])
    write_outputs(args.out, payload)
    print(f"wrote {args.out}/results.json, results.csv, score.png "
          f"({len(payload['samples'])} records from {len(args.inputs)} runs)")


if __name__ == "__main__":
    run_main(main)
