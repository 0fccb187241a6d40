"""Merges run_accuracy.py results run as separate processes (e.g. one per task and length, in
parallel) into one results.json / results.csv / score.png, re-aggregated from the per-sample
records, so the merged table is exactly what one run over all of them would print.

    python experiments/merge_accuracy.py --out runs/acc runs/acc_passkey runs/acc_niah_single

Inputs must come from the same model; a (task, length, question, policy, budget, depth)
record present in two inputs is counted once if both hold the same output and score (a
deterministic rerun of the same prompt) and is an error otherwise, unless its policy is named
in --replace: then the last input holding that policy supplies all its records
(`policy@question`: all its records of that question protocol).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.accuracy_results import (load, merge, print_summary,  # noqa: E402
                                          write_outputs)
from experiments.cli import Parser, run_main  # noqa: E402


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("inputs", nargs="+", help="run_accuracy.py output directories or files")
    p.add_argument("--out", required=True, help="directory for the merged outputs")
    p.add_argument("--replace", default="",
                   help="comma-separated policy specs taken only from the last input that "
                        "has them (a rerun of those policies supersedes the earlier records); "
                        "spec@question (e.g. mpcache@after) replaces that question protocol's "
                        "records only")
    args = p.parse_args(argv)
    replace = tuple(x for x in args.replace.split(",") if x)
    payload = merge([load(path) for path in args.inputs], replace)
    payload["command"].append("python experiments/merge_accuracy.py "
                              + " ".join(argv if argv is not None else sys.argv[1:]))
    print_summary(payload["rows"])
    write_outputs(args.out, payload)
    print(f"wrote {args.out}/results.json, results.csv, score.png "
          f"({len(payload['samples'])} records from {len(args.inputs)} runs)")


if __name__ == "__main__":
    run_main(main)
