"""Markdown tables from results.json files (so README figures are pasted, never typed).

    python experiments/results_table.py runs/cheetah_8192/results.json runs/aby3_8192/results.json
    python experiments/results_table.py runs/acc/results.json
    python experiments/results_table.py --pivot runs/acc_passkey/results.json runs/acc_niah/results.json
    python experiments/results_table.py results/netval/results.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402

CATS = ("linear", "attention", "softmax", "selection", "gather", "other")


def spu_table(res: dict) -> str:
    rows = res["rows"]
    lines = ["| protocol | seq | policy | GB (all parties) | sends (busiest) | compute s | "
             "LAN s* | WAN s* | bytes vs full | attention bytes vs full | LAN vs full | "
             "WAN vs full |", "|" + "---|" * 12]
    for r in rows:
        red = r["reduction_vs_full"]
        lines.append(f"| {r['protocol']} | {r['seq']} | {r['policy']} | {r['bytes'] / 1e9:.2f} "
                     f"| {r['sends']:,} | {r['compute_s']:.0f} | {r['latency_s']['lan']:.0f} | "
                     f"{r['latency_s']['wan']:.0f} | {red['bytes']:.2f}x | "
                     f"{red['attention_bytes']:.2f}x | {red['lan']:.2f}x | {red['wan']:.2f}x |")
    lines += ["", "| protocol | seq | policy | " + " | ".join(f"{c} GB" for c in CATS) +
              " | attention-module sends | static step once (GB, sends) |",
              "|" + "---|" * (len(CATS) + 5)]
    for r in rows:
        st = r.get("static_prefill")
        static = "-" if not st else (f"{st['bytes'] / 1e9:.1f}, {st['sends']:,}"
                                     + (" (extrapolated)" if st["extrapolated"] else ""))
        lines.append(f"| {r['protocol']} | {r['seq']} | {r['policy']} | "
                     + " | ".join(f"{r['bytes_by_category'].get(c, 0) / 1e9:.2f}" for c in CATS)
                     + f" | {r['attention_sends']:,} | {static} |")
    return "\n".join(lines)


def accuracy_table(res: dict) -> str:
    rows = res["rows"]
    lines = ["| task | length | question | policy | budget | score | n | answer logp vs full | "
             "attn cosine | needle attended | attended | decode s/token |", "|" + "---|" * 12]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(f"| {r['task']} | {r['length']} | {r['question']} | {r['policy']} | "
                     f"{r['budget']:.2f} | {r['score']:.2f} | {r['n']} | "
                     f"{f(r['logprob_vs_full'], '.2f')} | {f(r['attn_cosine'], '.3f')} | "
                     f"{f(r['needle_fraction'], '.2f')} | {f(r['attended_fraction'], '.3f')} | "
                     f"{f(r['decode_s_per_token'], '.3f')} |")
    return "\n".join(lines)


def accuracy_pivot(results: list, tasks=None) -> str:
    """Score per policy (rows) and (task, length, question) (columns), over several files;
    only `tasks` if given."""
    rows = [r for res in results for r in res["rows"] if tasks is None or r["task"] in tasks]
    if not rows:
        raise ConfigError(f"no rows for tasks {sorted(tasks)}")
    cols = list(dict.fromkeys((r["task"], r["length"], r["question"]) for r in rows))
    pols = list(dict.fromkeys((r["policy"], r["budget"]) for r in rows))
    cell = {(r["policy"], r["budget"], r["task"], r["length"], r["question"]): r for r in rows}
    lines = ["| policy | budget | " + " | ".join(f"{t} {n} {q}" for t, n, q in cols)
             + " | mean |", "|" + "---|" * (len(cols) + 3)]
    for pol, b in pols:
        got = [cell.get((pol, b) + c) for c in cols]
        scores = [g["score"] for g in got if g is not None]
        lines.append(f"| {pol} | {b:.2f} | " + " | ".join(
            "-" if g is None else f"{g['score']:.2f} (n={g['n']})" for g in got)
            + f" | {sum(scores) / len(scores):.2f} |")
    return "\n".join(lines)


def rename_policies(paths, results, renames):
    """Copies of `results` with policies renamed per file ([(path, old, new)], applied at
    once, not chained). The same cell in two files (the full cache, say) is kept once if both
    agree on score and n. An OLD missing from its file, an unknown file, or two disagreeing
    rows for one cell is an error."""
    by_file = {}
    for path, old, new in renames:
        if path not in paths:
            raise ConfigError(f"--rename: {path} is not among the files")
        by_file.setdefault(path, {})[old] = new
    out, seen = [], {}
    for path, res in zip(paths, results):
        table = by_file.get(path, {})
        missing = set(table) - {r["policy"] for r in res["rows"]}
        if missing:
            raise ConfigError(f"--rename: {path} has no policy {sorted(missing)[0]}")
        rows = []
        for r in res["rows"]:
            r = dict(r, policy=table.get(r["policy"], r["policy"]))
            key = (r["policy"], r["budget"], r["task"], r["length"], r["question"])
            if key in seen:
                if (seen[key]["score"], seen[key]["n"]) != (r["score"], r["n"]):
                    raise ConfigError(f"two different rows for {key} (check --rename)")
                continue
            seen[key] = r
            rows.append(r)
        out.append(dict(res, rows=rows))
    return out


def netval_table(res: dict) -> str:
    refills = "refills" in res["rows"][0]  # validate_network.py since the refill model
    head = ("| protocol | block | network | " + ("runs | refills | " if refills else "")
            + "MB (busiest) | sends (busiest) | " + ("refill sends | " if refills else "")
            + "T_comp s | measured s | projected s | error |"
            + (" error, refills as round trips |" if refills else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        lines.append(f"| {r['protocol']} | {r['block']} | {r['mbit']:g} Mbit/s, "
                     f"{r['rtt_ms']:g} ms RTT | "
                     + (f"{r['runs']} | {r['refills']} | " if refills else "")
                     + f"{r['bytes_max'] / 1e6:.2f} | {r['sends_max']:,.0f} | "
                     + (f"{r['refill_sends_max']:,.0f} | " if refills else "")
                     + f"{r['compute_s']:.2f} | {r['measured_s']:.2f} | {r['projected_s']:.2f} | "
                     f"{r['error']:+.0%} |"
                     + (f" {r['error_no_refill_model']:+.0%} |" if refills else ""))
    return "\n".join(lines)


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not res.get("rows"):
        raise ConfigError(f"{path} has no rows")
    return res


def main() -> None:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--pivot", action="store_true",
                   help="accuracy files: one score table, policies x (task, question)")
    p.add_argument("--rename", nargs=3, action="append", default=[],
                   metavar=("FILE", "OLD", "NEW"),
                   help="with --pivot: report FILE's policy OLD as NEW (a default that changed "
                   "since FILE was written; printed with the table)")
    p.add_argument("--tasks", help="with --pivot: only these tasks (comma list)")
    args = p.parse_args()
    results = [_load(path) for path in args.files]
    if args.pivot:
        renames = rename_policies(args.files, results, args.rename)
        for path, res in zip(args.files, results):
            print(f"<!-- from {path}: {res.get('command', '')} -->")
        for path, old, new in args.rename:
            print(f"<!-- {path}: policy {old} reported as {new} -->")
        tasks = set(args.tasks.split(",")) if args.tasks else None
        print(accuracy_pivot(renames, tasks))
        return
    for path, res in zip(args.files, results):
        rows = res["rows"]
        print(f"<!-- from {path}: {res.get('command', '')} -->")
        if "measured_s" in rows[0]:
            print(netval_table(res))
        else:
            print(spu_table(res) if "bytes" in rows[0] else accuracy_table(res))
        print()


if __name__ == "__main__":
    run_main(main)
