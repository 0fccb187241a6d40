"""run_accuracy.py's results: reading a results file, aggregating per-sample records into
rows, merging separate runs, and writing results.json / results.csv / score.png. Shared by
run_accuracy.py (writes and resumes) and merge_accuracy.py (merges).

A row is the mean over the samples of one (task, length, question, policy, budget); a record
is one sample's metrics under one policy and budget (run_accuracy.evaluate_batch).
"""

from __future__ import annotations

import json
import os

from experiments.cli import rows_to_csv, write_json_atomic, write_outputs_atomic
from mpc_llama.errors import ConfigError


def load(path):
    """A run_accuracy.py results payload from its output directory or results.json."""
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


def merge(results, replace=()):
    """One payload from several run_accuracy payloads (records concatenated, rows
    re-aggregated). replace: policy specs whose records come only from the LAST input that
    has them (a rerun supersedes an earlier run of that policy); `spec@question` (e.g.
    mpcache@after) replaces that question protocol's records only. A sample in two inputs
    with the same output and score (a deterministic rerun of the same prompt) is counted
    once. Raises ConfigError on mixed models, a sample present twice with different
    results, or a replaced policy that no input has."""
    models = {r["model"] for r in results}
    if len(models) > 1:
        raise ConfigError(f"inputs come from different models: {sorted(models)}")

    def which(rec):
        """The replace item that covers record `rec`, or None."""
        for item in (f"{rec['policy']}@{rec['question']}", rec["policy"]):
            if item in replace:
                return item
        return None

    owner = {}
    for i, res in enumerate(results):
        for rec in res["samples"]:
            item = which(rec)
            if item is not None:
                owner[item] = i
    missing = sorted(set(replace) - set(owner))
    if missing:
        raise ConfigError(f"no input has policy {missing[0]!r} to replace")
    seen, records = {}, []
    for i, res in enumerate(results):
        for rec in res["samples"]:
            item = which(rec)
            if item is not None and owner[item] != i:
                continue
            key = (rec["task"], rec["length"], rec["question"], rec["policy"], rec["budget"],
                   rec["depth"])
            if key in seen:
                if (seen[key]["output"], seen[key]["score"]) == (rec["output"], rec["score"]):
                    continue   # the same sample rerun with the same result: counted once
                raise ConfigError(f"sample {key} appears in more than one input with "
                                  f"different results")
            seen[key] = rec
            records.append(rec)
    prefill = {}
    for res in results:
        for n, t in res.get("prefill", {}).items():
            prefill.setdefault(n, []).append(t)
    commands = []
    for r in results:   # a merged input lists its own inputs' commands
        commands += r["command"] if isinstance(r["command"], list) else [r["command"]]
    return {"command": commands, "model": models.pop(),
            "rows": aggregate(records), "samples": records, "prefill": prefill,
            "runs": [r.get("runs") for r in results],
            "platform": [r.get("platform") for r in results]}


def aggregate(records):
    """Rows from per-sample records: means per (task, length, question, policy, budget),
    decode seconds per token as the median; None metrics are left out of the means."""
    import numpy as np

    groups = {}
    for r in records:
        groups.setdefault((r["task"], r["length"], r["question"], r["policy"], r["budget"]),
                          []).append(r)
    rows = []
    for (task, length, question, policy, budget), rs in groups.items():
        def mean(k, f=np.mean):
            vals = [r[k] for r in rs if r[k] is not None]
            return float(f(vals)) if vals else None
        rows.append({"task": task, "length": length, "question": question, "policy": policy,
                     "budget": budget, "score": mean("score"), "n": len(rs),
                     "answer_logprob": mean("answer_logprob"),
                     "logprob_vs_full": mean("logprob_vs_full"),
                     "attn_cosine": mean("attn_cosine"),
                     "attn_cosine_worst_layer": mean("attn_cosine_worst_layer"),
                     "needle_fraction": mean("needle_fraction"),
                     "attended_fraction": mean("attended_fraction"),
                     "decode_s_per_token": mean("decode_s_per_token", np.median)})
    return rows


def print_summary(rows):
    print(f"{'task':<18}{'len':>6} {'q':<7}{'policy':<18}{'budget':>7}{'score':>7}{'n':>4}"
          f"{'dlogp':>8}{'cos':>7}{'needle':>8}{'attended':>9}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r['task']:<18}{r['length']:>6} {r['question']:<7}{r['policy']:<18}"
              f"{r['budget']:>7.2f}{r['score']:>7.2f}{r['n']:>4}"
              f"{f(r['logprob_vs_full'], '>8.2f')}{f(r['attn_cosine'], '>7.3f')}"
              f"{f(r['needle_fraction'], '>8.2f')}{f(r['attended_fraction'], '>9.3f')}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["length"], r["question"]) for r in rows})
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.3 * cols, 3.3 * nrows), squeeze=False)
    for ax, (task, length, question) in zip(axes.flat, panels):
        rs = [r for r in rows if (r["task"], r["length"], r["question"]) == (task, length,
                                                                             question)]
        full = [r["score"] for r in rs if r["policy"] == "full"]
        for pol in sorted({r["policy"] for r in rs} - {"full"}):
            pts = sorted((r["budget"], r["score"]) for r in rs if r["policy"] == pol)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
        if full:
            ax.axhline(full[0], color="black", linestyle="--", label="full")
        ax.set_title(f"{task}, {length} tok, question {question}", fontsize=9)
        ax.set_xlabel("budget (attended fraction)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir, payload):
    """results.json, results.csv and the plots, all or none (experiments.cli)."""
    def fill(tmp):
        write_json_atomic(str(tmp / "results.json"), payload)
        (tmp / "results.csv").write_text(rows_to_csv(payload["rows"]))
        plot(payload["rows"], str(tmp / "score.png"))

    write_outputs_atomic(out_dir, fill)
