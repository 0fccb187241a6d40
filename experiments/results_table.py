r"""Markdown tables from results.json files (so README figures are pasted, never typed).

    python experiments/results_table.py runs/cheetah_8192/results.json runs/aby3_8192/results.json
    python experiments/results_table.py runs/acc/results.json
    python experiments/results_table.py --pivot runs/acc_passkey/results.json runs/acc_niah/results.json
    python experiments/results_table.py results/netval/results.json
    python experiments/results_table.py --headline results/cheetah_8192/results.json \
        --accuracy results/acc_4k_inside/results.json results/acc_4k_after/results.json \
        --figure results/headline.png

--headline: per cost file one table of each policy's whole decode step (bytes, projected LAN
and WAN seconds, all vs the full cache) next to its accuracy at the cost file's budget: per
prompt length of the --accuracy files the mean over its (task, question) cells, relative to
the full cache's and to the oracle's (one comma-separated entry per length); --figure draws
WAN latency against the accuracy at the longest length.
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


def command_of(res: dict) -> str:
    """The command(s) behind a results file: merged files list each run's, joined by " ; "."""
    cmd = res.get("command", "")
    return " ; ".join(cmd) if isinstance(cmd, list) else cmd


def captured(full: float, policy: float, oracle: float):
    """Share of the oracle's saving a policy captures, (full - policy) / (full - oracle), for
    one figure of one run (issue 16's metric); None when the oracle saves nothing."""
    return None if full == oracle else (full - policy) / (full - oracle)


CAPTURED = (("bytes", lambda r: r["bytes"]), ("WAN", lambda r: r["latency_s"]["wan"]),
            ("attention LAN", lambda r: r["attention_latency_s"]["lan"]))


CAPTURED_HEADLINE = tuple(f for _, f in CAPTURED)   # bytes, WAN, attention LAN


def captured_table(res: dict) -> str:
    """Per (protocol, seq) the captured share of every policy on whole-step bytes, projected
    WAN seconds and the attention modules' projected LAN seconds, and its static step in
    decode steps (bytes) of the full cache and of its own. Needs the run's full and oracle rows."""
    rows = res["rows"]
    lines = ["| protocol | seq | policy | GB per step | WAN s* | attention LAN s* | "
             "captured bytes | captured WAN | captured attention LAN | "
             "static step once, in steps (bytes): full's, own |", "|" + "---|" * 10]
    for r in rows:
        ref = {p: next((x for x in rows if x["policy"] == p and x["seq"] == r["seq"]
                        and x["protocol"] == r["protocol"]), None) for p in ("full", "oracle")}
        if None in ref.values():
            raise ConfigError(f"captured shares need full and oracle rows at {r['seq']}")
        shares = [captured(f(ref["full"]), f(r), f(ref["oracle"])) for _, f in CAPTURED]
        st = r.get("static_prefill")
        static = "-" if not st else (f"{st['bytes'] / ref['full']['bytes']:,.1f}, "
                                     f"{st['bytes'] / r['bytes']:,.1f}"
                                     + (" (extrapolated)" if st["extrapolated"] else ""))
        lines.append(f"| {r['protocol']} | {r['seq']} | {r['policy']} | {r['bytes'] / 1e9:.2f} | "
                     f"{r['latency_s']['wan']:,.0f} | {r['attention_latency_s']['lan']:,.0f} | "
                     + " | ".join("-" if v is None else f"{v:.2f}" for v in shares)
                     + f" | {static} |")
    return "\n".join(lines)


def selection_table(res: dict) -> str:
    """experiments/selection_cost.py results: one layer's selection block per policy (and,
    with --parts, its stages on their own, indented under it)."""
    lines = ["| protocol | seq | policy | KV heads | MB (all parties) | sends (busiest) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = f"... {r['part']}" if r.get("part") else r["policy"]
        lines.append(f"| {res.get('protocol', '-')} | {r['seq']} | {name} | "
                     f"{r['kv_heads']} | {r['bytes'] / 1e6:.2f} | {r['sends']:,.0f} |")
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


def accuracy_by_policy(results: list, budget: float) -> dict:
    """{policy: (mean score, samples, cells)} over every (task, length, question) cell of the
    accuracy files: each policy at `budget`, the full cache at 1.0."""
    cells = {}
    for res in results:
        for r in res["rows"]:
            if abs(r["budget"] - (1.0 if r["policy"] == "full" else budget)) < 1e-9:
                cells.setdefault(r["policy"], {})[(r["task"], r["length"], r["question"])] = r
    return {p: (sum(r["score"] for r in c.values()) / len(c), sum(r["n"] for r in c.values()),
                len(c)) for p, c in cells.items()}


def headline_table(cost: dict, accuracy, where: str = "") -> str:
    """One row per policy of a run_spu.py results file, with its accuracy_by_policy entry;
    `accuracy`: one such dict, or a list of them (one per prompt length: each score cell then
    lists them in order, comma-separated); `where`: the accuracy's setting, for the header."""
    accs = [accuracy] if isinstance(accuracy, dict) else list(accuracy)
    rows = cost["rows"]
    budget = next(r["budget"] for r in rows if r["budget"] is not None)
    lines = [f"| policy | GB per step | LAN s* | WAN s* | bytes vs full | LAN vs full | "
             f"WAN vs full | captured: bytes, WAN, attention LAN | score at {budget:.0%}{where} | "
             f"score vs full | score vs oracle |", "|" + "---|" * 11]
    ref = {p: next((x for x in rows if x["policy"] == p), None) for p in ("full", "oracle")}

    def ratio(a, b):
        return "-" if a is None or not b else f"{a / b:.0%}"

    def shares(r):   # captured share of the oracle's saving (captured_table), bytes and WAN
        if None in ref.values():
            return "-"
        got = [captured(f(ref["full"]), f(r), f(ref["oracle"])) for f in CAPTURED_HEADLINE]
        return ", ".join("-" if v is None else f"{v:.2f}" for v in got)

    def scores(policy):   # (score, vs full, vs oracle), one entry per accuracy dict
        got = []
        for acc in accs:
            s = acc.get(policy, (None,))[0]
            got.append(("-" if s is None else f"{s:.2f}",
                        ratio(s, acc.get("full", (None,))[0]),
                        ratio(s, acc.get("oracle", (None,))[0])))
        return [", ".join(col) for col in zip(*got)] if got else ["-"] * 3

    for r in rows:
        red = r["reduction_vs_full"]
        score, vs_full, vs_oracle = scores(r["policy"])
        lines.append(f"| {r['policy']} | {r['bytes'] / 1e9:.2f} | {r['latency_s']['lan']:,.0f} "
                     f"| {r['latency_s']['wan']:,.0f} | {red['bytes']:.2f}x | "
                     f"{red['lan']:.2f}x | {red['wan']:.2f}x | {shares(r)} | "
                     f"{score} | {vs_full} | {vs_oracle} |")
    return "\n".join(lines)


def selecting_notes(cost: dict) -> str:
    """One line per kept-selection policy of a run_spu.py results file: its step that selects
    afresh (the table's row is the mean step), with the captured shares of that step."""
    rows = cost["rows"]
    ref = {p: next((x for x in rows if x["policy"] == p), None) for p in ("full", "oracle")}
    lines = []
    for r in rows:
        s = r.get("selecting_step")
        if s is None:
            continue
        got = ("" if None in ref.values() else ", captured " + ", ".join(
            "-" if v is None else f"{v:.2f}"
            for v in (captured(f(ref["full"]), f(s), f(ref["oracle"]))
                      for f in CAPTURED_HEADLINE)))
        lines.append(f"- `{r['policy']}`, a step that selects afresh (the table's row is the "
                     f"mean over its refresh period): {s['bytes'] / 1e9:.2f} GB, LAN "
                     f"{s['latency_s']['lan']:,.0f} s*, WAN {s['latency_s']['wan']:,.0f} s*"
                     f"{got}")
    return "\n".join(lines)


def headline_figure(costs: list, accuracy: dict, path: str, what: str = "") -> None:
    """One panel per cost file: projected WAN seconds of a decode step (x) against the
    accuracy at the budget (y; `what` names its setting on the axis), one point per policy
    with an accuracy (colour and marker per policy, one legend above the panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(
        r["policy"] for cost in costs for r in cost["rows"]))}
    marker = {p: "osD^vP*X<>"[i % 10] for i, p in enumerate(colour)}
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        shown = sorted((r for r in cost["rows"] if r["policy"] in accuracy),
                       key=lambda r: r["latency_s"]["wan"])
        for r in shown:   # one marker per policy, named in the figure's legend
            x, y = r["latency_s"]["wan"], accuracy[r["policy"]][0]
            ax.scatter([x], [y], color=colour[r["policy"]], marker=marker[r["policy"]],
                       s=42, alpha=0.85, label=r["policy"])
        rows = cost["rows"]
        ax.set_xlim(0, 1.15 * max(r["latency_s"]["wan"] for r in rows))
        ax.set_ylim(-0.05, 1.1)
        ax.set_title(f"{rows[0]['protocol']}, {rows[0]['seq']} tokens", fontsize=9)
        ax.set_xlabel("decode step, WAN seconds (projected)")
        ax.set_ylabel(f"accuracy (mean score{what})")
    named = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            named.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    if named:
        fig.legend(named.values(), named.keys(), loc="upper center", ncol=len(named),
                   fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


FLOOR_POLICIES = ("full", "oracle")


def floor_table(before: dict, after: dict, policies=FLOOR_POLICIES) -> str:
    """Per category, GB per step of `full` and `oracle` in two run_spu results of the same
    protocol and length (e.g. before and after a change to what eviction cannot touch), with
    the ratio before / after."""
    if (before["protocol"]["name"], before["rows"][0]["seq"]) != \
            (after["protocol"]["name"], after["rows"][0]["seq"]):
        raise ConfigError("--floor: the two files are of different protocols or lengths")
    lines = ["| protocol | policy | category | GB before | GB after | before / after |",
             "|---|---|---|---|---|---|"]
    for pol in policies:
        rows = [next((r for r in res["rows"] if r["policy"] == pol), None)
                for res in (before, after)]
        if None in rows:
            raise ConfigError(f"--floor: both files need policy {pol}")
        cats = [c for c in CATS if any(r["bytes_by_category"].get(c) for r in rows)]
        for cat in cats + ["whole step"]:
            b, a = (r["bytes"] if cat == "whole step" else r["bytes_by_category"].get(cat, 0.0)
                    for r in rows)
            ratio = f"{b / a:.2f}x" if a else "-"
            lines.append(f"| {before['protocol']['name']} | {pol} | {cat} | {b / 1e9:.3f} | "
                         f"{a / 1e9:.3f} | {ratio} |")
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


def main(argv=None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("files", nargs="+", help="results.json files of run_spu.py, run_accuracy.py "
                   "or validate_network.py")
    p.add_argument("--pivot", action="store_true",
                   help="accuracy files: one score table, policies x (task, question)")
    p.add_argument("--rename", nargs=3, action="append", default=[],
                   metavar=("FILE", "OLD", "NEW"),
                   help="with --pivot or --headline (on an --accuracy FILE): report FILE's "
                   "policy OLD as NEW (a default that changed since FILE was written; printed "
                   "with the table)")
    p.add_argument("--tasks", help="with --pivot: only these tasks (comma list)")
    p.add_argument("--headline", action="store_true",
                   help="FILES are run_spu.py results: one cost-and-accuracy table each")
    p.add_argument("--accuracy", nargs="+", default=[], metavar="FILE",
                   help="with --headline: run_accuracy.py results giving the score column")
    p.add_argument("--figure", help="with --headline: write WAN seconds vs accuracy here")
    p.add_argument("--only", help="with --headline: only these policies of the cost files "
                                  "(comma list; full and oracle are always kept)")
    p.add_argument("--floor", action="store_true",
                   help="FILES are pairs of run_spu.py results (before after ...): the "
                   "full and oracle steps per category, before and after")
    p.add_argument("--floor-policies", default=",".join(FLOOR_POLICIES),
                   help="with --floor: the policies shown (comma list)")
    args = p.parse_args(argv)
    results = [_load(path) for path in args.files]
    if args.floor:
        if len(results) % 2 or any("bytes" not in res["rows"][0] for res in results):
            raise ConfigError("--floor: FILES must be pairs of run_spu.py results")
        for i in range(0, len(results), 2):
            print(f"<!-- before: {args.files[i]}: {command_of(results[i])} -->")
            print(f"<!-- after: {args.files[i + 1]}: {command_of(results[i + 1])} -->")
        pols = [x for x in args.floor_policies.split(",") if x]
        tables = [floor_table(results[i], results[i + 1], pols).split("\n", 2)
                  for i in range(0, len(results), 2)]
        print("\n".join(tables[0][:2] + [t[2] for t in tables]))
        return
    if args.headline:
        if any("bytes" not in res["rows"][0] for res in results):
            raise ConfigError("--headline: FILES must be run_spu.py results")
        if args.only:
            keep = set(args.only.split(",")) | {"full", "oracle"}
            results = [dict(res, rows=[r for r in res["rows"] if r["policy"] in keep])
                       for res in results]
        acc_files = rename_policies(args.accuracy, [_load(path) for path in args.accuracy],
                                    args.rename)
        budgets = {r["budget"] for res in results for r in res["rows"]} - {None}
        if len(budgets) != 1:
            raise ConfigError(f"--headline: the cost files mix budgets {sorted(budgets)}")
        budget = budgets.pop()
        lengths = sorted({r["length"] for res in acc_files for r in res["rows"]})
        accuracy = [accuracy_by_policy([dict(res, rows=[r for r in res["rows"]
                                                        if r["length"] == length])
                                        for res in acc_files], budget) for length in lengths]
        where = (f", {'/'.join(map(str, lengths))} tok, n="
                 + "/".join(str(a["full"][1]) for a in accuracy)
                 if all("full" in a for a in accuracy) else "")
        for path, res in zip(args.accuracy, acc_files):
            print(f"<!-- score from {path}: {command_of(res)} -->")
        for path, old, new in args.rename:
            print(f"<!-- {path}: policy {old} reported as {new} -->")
        for path, res in zip(args.files, results):
            print(f"<!-- cost from {path}: {command_of(res)} -->")
            print(headline_table(res, accuracy, where))
            notes = selecting_notes(res)
            print(("\n" + notes) if notes else "")
            print()
        if args.figure:
            headline_figure(results, accuracy[-1] if accuracy else {}, args.figure,
                            f", {lengths[-1]} tokens" if lengths else "")
        return
    if args.pivot:
        renames = rename_policies(args.files, results, args.rename)
        for path, res in zip(args.files, results):
            print(f"<!-- from {path}: {command_of(res)} -->")
        for path, old, new in args.rename:
            print(f"<!-- {path}: policy {old} reported as {new} -->")
        tasks = set(args.tasks.split(",")) if args.tasks else None
        print(accuracy_pivot(renames, tasks))
        return
    for path, res in zip(args.files, results):
        rows = res["rows"]
        print(f"<!-- from {path}: {command_of(res)} -->")
        if "measured_s" in rows[0]:
            print(netval_table(res))
        elif "kv_heads" in rows[0]:
            print(selection_table(res))
        elif "macs" in rows[0]:
            from experiments.gather_shapes import markdown as gather_table
            print(gather_table(rows))
        elif "form" in rows[0] and "what" in rows[0]:
            from experiments.gather_shapes import onehot_markdown
            print(onehot_markdown(rows))
        elif "bytes" in rows[0] and "reduction_vs_full" not in rows[0]:
            raise ConfigError(f"{path} is not a results file of run_spu.py, run_accuracy.py, "
                              "selection_cost.py, gather_shapes.py or validate_network.py "
                              "(nonlinear_cost.py prints its own table)")
        else:
            print(spu_table(res) if "bytes" in rows[0] else accuracy_table(res))
            if "bytes" in rows[0] and {"full", "oracle"} <= {r["policy"] for r in rows}:
                print()
                print(captured_table(res))
            notes = selecting_notes(res) if "bytes" in rows[0] else ""
            if notes:
                print()
                print(notes)
        print()


if __name__ == "__main__":
    run_main(main)
