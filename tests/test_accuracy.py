"""Accuracy harness: task generators, metrics by hand, LongBench loading, CLI end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import longbench, tasks
from mpc_llama.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
@pytest.mark.parametrize("depth", [0.1, 0.7])
def test_generator_length_depth_and_answer(smollm2, task, depth):
    tok = smollm2.tokenizer
    s = tasks.generate(task, tok, 1024, depth, seed=3)
    assert len(s.prompt_ids) == 1024                       # exact, so within 2%
    assert s.context_ids + s.question_ids == s.prompt_ids
    context = tok.decode(s.context_ids)
    for a in s.answers:
        assert a in context
    assert s.answers == tasks.generate(task, tok, 1024, depth, seed=3).answers  # seeded
    assert s.answers != tasks.generate(task, tok, 1024, depth, seed=4).answers
    if task != "common_words":
        start = s.needle_spans[0][0]
        head = len(tok.chat(""))  # roughly where the context starts
        assert abs((start - head) / (len(s.context_ids) - head) - depth) < 0.05
        for a, b in s.needle_spans:
            assert any(x in tok.decode(s.prompt_ids[a:b]) for x in s.answers) or \
                task == "niah_multikey"
    else:
        counts = {w: context.count(f". {w}\n") + context.count(f". {w} ")
                  for w in tasks.KEY_WORDS}
        rare = max(c for w, c in counts.items() if w not in s.answers)
        assert min(counts[w] for w in s.answers) > rare  # the 10 answers are the most common


def test_task_score_by_hand():
    assert tasks.score("passkey", "The pass key is 12345.", ["12345"]) == 1.0
    assert tasks.score("niah_multivalue", "1111111 and 3333333", ["1111111", "2222222",
                                                                  "3333333", "4444444"]) == 0.5
    assert tasks.score("variable_tracking", "abcde", ["ABCDE", "XYZ"]) == 0.5


def test_longbench_metrics_by_hand():
    # tokens after normalisation: [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3
    assert longbench.qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # LCS 3 of 4 words each way
    assert longbench.rouge_score("a b c d", "a b x d") == pytest.approx(0.75, abs=1e-6)
    assert longbench.rouge_score("", "a b") == 0.0
    assert longbench.classification_score("LOC and NUM", "LOC",
                                          all_classes=["LOC", "NUM", "HUM"]) == 0.5
    assert longbench.classification_score("HUM", "LOC", all_classes=["LOC", "HUM"]) == 0.0
    assert longbench.retrieval_score("Paragraph 12, or 3", "Paragraph 12") == 0.5
    assert longbench.count_score("There are 7 paragraphs", 7) == 1.0
    assert longbench.count_score("none", 7) == 0.0
    assert longbench.code_sim_score("# comment\nx = 1", "x = 1") == 1.0
    assert longbench.code_sim_score("abcd", "abce") == pytest.approx(0.75)
    rec = {"answers": ["Paris", "City of Paris"], "all_classes": []}
    assert longbench.score_prediction("hotpotqa", "paris", rec) == 1.0
    assert longbench.score_prediction("triviaqa", "Rome\nParis", rec) == 0.0  # first line


def test_longbench_loading(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(
        json.dumps({"context": "c", "input": "q", "answers": ["a"], "all_classes": None})
        + "\n" + json.dumps({"context": "d", "input": "r", "answers": ["b"]}) + "\n")
    recs = longbench.load(str(tmp_path), "hotpotqa", limit=1)
    assert recs == [{"context": "c", "input": "q", "answers": ["a"], "all_classes": []}]
    assert "Question: q" in longbench.prompt_text("hotpotqa", recs[0])
    with pytest.raises(ConfigError, match="not found"):
        longbench.load(str(tmp_path), "qasper")
    with pytest.raises(ConfigError, match="Chinese"):
        longbench.load(str(tmp_path), "dureader")
    (tmp_path / "musique.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not a LongBench record"):
        longbench.load(str(tmp_path), "musique")


def test_longbench_dir_alone_runs_every_dataset_in_it(tmp_path):
    """--longbench DIR without --longbench-tasks: every supported DIR/NAME.jsonl, and no
    synthetic task unless --tasks asks for one (never silently the RULER defaults)."""
    from experiments.run_accuracy import SYNTHETIC, build_setting, parse_args

    rec = json.dumps({"context": "c", "input": "q", "answers": ["a"]}) + "\n"
    for name in ("qasper", "hotpotqa", "dureader", "notes"):  # Chinese and unknown: skipped
        (tmp_path / f"{name}.jsonl").write_text(rec)
    assert longbench.datasets_in(str(tmp_path)) == ["qasper", "hotpotqa"]  # PROMPTS order
    setting = build_setting(parse_args(["--longbench", str(tmp_path), "--samples", "1"]))
    assert setting["tasks"] == [] and list(setting["longbench"]) == ["qasper", "hotpotqa"]
    setting = build_setting(parse_args(["--longbench", str(tmp_path), "--tasks", "passkey",
                                        "--longbench-tasks", "hotpotqa"]))
    assert setting["tasks"] == [("passkey", "noise")] and list(setting["longbench"]) == ["hotpotqa"]
    assert parse_args([]).tasks == ",".join(SYNTHETIC)  # no --longbench: every synthetic task


def run_cli(*args):
    return subprocess.run([sys.executable, "experiments/run_accuracy.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "passkey,nope"], "unknown task"),
    (["--lengths", "9000"], "exceeds the model's context"),
    (["--longbench", "/no/such/dir", "--longbench-tasks", "hotpotqa", "--tasks", ""],
     "not found"),
    (["--longbench", "/no/such/dir"], "LongBench directory /no/such/dir not found"),
    (["--longbench", "/"], "holds no LongBench file"),
    (["--budgets", "0"], "budget 0.0"),
    (["--questions", "before"], "--questions"),
])
def test_bad_input_refused_before_any_output(tmp_path, args, needle):
    from experiments.run_accuracy import build_setting, parse_args

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_setting(parse_args([*args, "--out", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("args,needle,own_process", [
    (["--tasks", "passkey,nope"], "unknown task", True),   # the script as a user starts it
    (["--longbench", "/no/such/dir"], "LongBench directory /no/such/dir not found", False),
    (["--budgets", "0.1", "--samples", "x"], "invalid int value", False),  # argparse's too
])
def test_cli_bad_input_one_line_exit_2(tmp_path, args, needle, own_process, cli):
    """The CLI turns those errors into one line on stderr and exit code 2. The script's own
    process start is checked here, once (the first case); the others run its main in-process
    through `run_main`, as `python experiments/run_accuracy.py` does."""
    from experiments.run_accuracy import main

    out = tmp_path / "out"
    if own_process:
        r = run_cli(*args, "--out", str(out))
        code, err = r.returncode, r.stderr
    else:
        code, _, err = cli(main, *args, "--out", out)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and needle in err, err
    assert not out.exists()


def test_merge_counts_a_rerun_sample_once_and_refuses_a_clash():
    """Two runs that share a policy's samples (a deterministic rerun): each counted once, so
    a cell keeps its n; the same key with another output is refused; --replace still wins."""
    from experiments.accuracy_results import merge

    def rec(policy, depth, output, score, question="after", budget=0.1):
        return {"task": "passkey", "length": 64, "question": question, "policy": policy,
                "budget": budget, "depth": depth, "output": output, "score": score,
                **{k: None for k in ("answer_logprob", "logprob_vs_full", "attn_cosine",
                                     "attn_cosine_worst_layer", "needle_fraction",
                                     "attended_fraction", "decode_s_per_token")}}

    def run(*records):
        return {"command": "x", "model": "m", "samples": list(records)}

    a = run(rec("full", 0.1, "1", 1.0, budget=1.0), rec("oracle", 0.1, "1", 1.0, budget=0.2),
            rec("mpcache", 0.1, "2", 0.0))
    b = run(rec("full", 0.1, "1", 1.0, budget=1.0), rec("mpcache", 0.1, "1", 1.0))
    got = merge([a, b], replace=("mpcache@after",))
    by = {(r["policy"], r["budget"]): (r["score"], r["n"]) for r in got["rows"]}
    assert by == {("full", 1.0): (1.0, 1), ("oracle", 0.2): (1.0, 1), ("mpcache", 0.1): (1.0, 1)}
    with pytest.raises(ConfigError, match="different results"):
        merge([a, b])   # mpcache's sample: two outputs, and no --replace


@pytest.mark.slow   # ~24 s; main() on the same model runs in the default suite too
def test_cli_end_to_end(tmp_path, smollm2, monkeypatch, cli):
    """The whole CLI in-process on the session's SmolLM2 (the process start: the test above).
    160 tokens and mpcache at 0.3, both samples in one batch, as in
    test_batched_rows_equal_one_by_one: run together, they share compiled layers."""
    from experiments.run_accuracy import main

    monkeypatch.setattr("mpc_llama.loading.load_model", lambda name: smollm2)
    out = tmp_path / "out"
    code, _, err = cli(main, "--tasks", "passkey", "--lengths", "160", "--samples", "2",
                       "--policies", "full,mpcache", "--budgets", "0.3", "--questions",
                       "inside,after", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json",
                                                      "score.png"]
    res = json.loads((out / "results.json").read_text())
    keys = {(row["policy"], row["question"]) for row in res["rows"]}
    assert keys == {(p, q) for p in ("full", "mpcache") for q in ("inside", "after")}
    for row in res["rows"]:
        assert row["n"] == 2 and 0.0 <= row["score"] <= 1.0
        assert row["task"] == "passkey" and row["length"] == 160
        if row["policy"] == "full":
            assert row["attn_cosine"] == pytest.approx(1.0, abs=1e-5)
            assert row["logprob_vs_full"] == 0.0 and row["needle_fraction"] == 1.0
        else:
            assert row["attended_fraction"] < 0.75
    full = [row for row in res["rows"] if row["policy"] == "full"]
    assert all(row["score"] == 1.0 for row in full)  # SmolLM2 finds a pass key at 160 tokens
    # merging runs split by question protocol re-aggregates to the same rows
    from experiments.merge_accuracy import main as merge_main

    parts = []
    for q in ("inside", "after"):
        part = dict(res, samples=[s for s in res["samples"] if s["question"] == q])
        (tmp_path / f"{q}.json").write_text(json.dumps(part))
        parts.append(str(tmp_path / f"{q}.json"))
    merge_main(["--out", str(tmp_path / "merged"), *parts])
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["rows"] == res["rows"]
    assert res["runs"] == {"planned": 4, "done": 4} and res["platform"]["backend"] == "cpu"
    # the same sample in two inputs: counted once when its results agree, else an error
    merge_main(["--out", str(tmp_path / "twice"), parts[0], *parts])
    assert json.loads((tmp_path / "twice" / "results.json").read_text())["rows"] == res["rows"]
    other = json.loads(open(parts[0]).read())
    other["samples"][0]["output"] += " (another output)"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="more than one input with different results"):
        merge_main(["--out", str(tmp_path / "clash"), parts[0], str(tmp_path / "other.json")])
    assert not (tmp_path / "clash").exists()
    # a rerun of one policy supersedes its earlier records, the others stay
    by_inside = next(r["score"] for r in res["rows"]
                     if (r["policy"], r["question"]) == ("mpcache", "inside"))
    rerun = dict(res, samples=[dict(s, score=0.0) for s in res["samples"]
                               if s["policy"] == "mpcache"])
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    merge_main(["--out", str(tmp_path / "replaced"), "--replace", "mpcache",
                str(tmp_path / "merged"), str(tmp_path / "rerun.json")])
    replaced = json.loads((tmp_path / "replaced" / "results.json").read_text())
    by = {(r["policy"], r["question"]): r["score"] for r in replaced["rows"]}
    assert by == {**{("full", q): 1.0 for q in ("inside", "after")},
                  **{("mpcache", q): 0.0 for q in ("inside", "after")}}
    assert len(replaced["samples"]) == len(res["samples"])
    # policy@question: only that protocol's records come from the rerun
    rerun_after = dict(rerun, samples=[s for s in rerun["samples"] if s["question"] == "after"])
    (tmp_path / "rerun_after.json").write_text(json.dumps(rerun_after))
    merge_main(["--out", str(tmp_path / "after_only"), "--replace", "mpcache@after",
                str(tmp_path / "merged"), str(tmp_path / "rerun_after.json")])
    after_only = json.loads((tmp_path / "after_only" / "results.json").read_text())
    by = {(r["policy"], r["question"]): r["score"] for r in after_only["rows"]}
    assert by == {("full", "inside"): 1.0, ("full", "after"): 1.0,
                  ("mpcache", "inside"): by_inside, ("mpcache", "after"): 0.0}
    assert len(after_only["samples"]) == len(res["samples"])
    with pytest.raises(ConfigError, match="no input has policy"):
        merge_main(["--out", str(tmp_path / "none"), "--replace", "quest", parts[0]])


@pytest.mark.slow  # ~9 s (the fast suite's time)
def test_max_minutes_stops_early_and_says_so(tmp_path, monkeypatch, smollm2, capsys):
    """The first batch always starts; no new one after the limit (the same settings as
    test_results_written_after_each_batch: its compiled layers are reused)."""
    from experiments import run_accuracy

    monkeypatch.setattr("mpc_llama.loading.load_model", lambda name: smollm2)
    out = tmp_path / "out"
    run_accuracy.main(["--tasks", "passkey", "--lengths", "160", "--samples", "2",
                       "--policies", "full", "--questions", "inside", "--max-minutes",
                       "0.0001", "--batch", "1", "--out", str(out)])
    assert "stopping after 1 of 2 samples" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["runs"] == {"planned": 2, "done": 1}
    assert [row["n"] for row in res["rows"]] == [1]


def test_spread_order_prefixes_cover_the_range():
    from experiments.run_accuracy import spread_order

    assert spread_order(1) == [0]
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    for n in (8, 20, 33):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
        half = sorted(order[: n // 2])  # the first half has samples in every quarter
        assert all(any(q * n / 4 <= i < (q + 1) * n / 4 for i in half) for q in range(4))


@pytest.mark.slow  # ~50 s on two cores: every policy decoded three times (a batch, each row)
def test_batched_rows_equal_one_by_one(smollm2):
    """Rows of a batch never interact: every metric matches decoding each sample alone
    (question "after": the fed question, greedy answer and teacher-forced answer all batched;
    snapkv's static step and mpcache's dynamic one)."""
    from eviction import policy_from_spec
    from experiments.run_accuracy import Evaluator, batches, evaluate_batch, synthetic_samples

    tok = smollm2.tokenizer
    samples = synthetic_samples(tok, "passkey", 160, [0.2, 0.7], 2, seed=3)
    policies = {("full", 1.0): None, ("mpcache", 0.3): policy_from_spec("mpcache", 0.3),
                ("snapkv", 0.3): policy_from_spec("snapkv", 0.3)}
    ev, eos = Evaluator(smollm2, 64), set(tok.eos_ids)
    groups = batches(samples, "after", 2)
    assert len(groups) == 1  # one batch of two
    together = evaluate_batch(ev, groups[0], "after", policies, eos, tok)[0]
    alone = [evaluate_batch(ev, [s], "after", policies, eos, tok)[0][0] for s in samples]
    assert len(together) == len(alone) == 2
    for a, b in zip(together, alone):
        for key in policies:
            assert a[key]["output"] == b[key]["output"]
            for m in ("answer_logprob", "attn_cosine", "attended_fraction", "needle_fraction"):
                assert a[key][m] == pytest.approx(b[key][m], abs=2e-3), (key, m)


def test_batches_group_equal_lengths_in_order():
    from experiments.run_accuracy import batches
    from experiments.tasks import Sample

    def s(n):
        return Sample("t", (0,) * n, (0,) * (n - 1), (0,), ("a",), (), 0.0, 1)

    got = batches([s(5), s(5), s(5), s(6), s(5)], "inside", 2)
    assert [[len(x.prompt_ids) for x in b] for b in got] == [[5, 5], [5, 5], [6]]


class _TableModel:
    """A stand-in evaluator for `evaluate_batch`: row r's next-token logits are a one-hot-ish
    function of the token it was last fed, table[r][token]; the cache is each row's history."""

    def __init__(self, table, first):
        import numpy as np

        self.table, self.first, self.steps = np.asarray(table), first, 0
        self.V = self.table.shape[1]

    def _logits(self, nxt):
        import jax.numpy as jnp
        import numpy as np

        z = np.full((len(nxt), self.V), -3.0, np.float32)
        z[np.arange(len(nxt)), nxt] = 2.0
        z += 0.01 * np.arange(self.V)  # distinct log-probabilities per token
        return jnp.asarray(z)

    def prompt(self, ids):
        return self._logits(self.first), None

    def cache(self, layers, capacity, policy):
        return tuple(() for _ in self.first)

    def copy_cache(self, cache):
        return cache  # tuples: nothing is updated in place

    def step(self, tokens, position, cache, policy, prompt_len, last_input=0):
        import numpy as np

        self.steps += 1
        tokens = [int(t) for t in tokens]
        nxt = [self.table[r][t] for r, t in enumerate(tokens)]
        diag = {"attended_pos": np.zeros((1, len(tokens), 1, 2), np.int32),
                "attn_out": np.ones((1, len(tokens), 4), np.float32)}
        return self._logits(nxt), tuple(h + (t,) for h, t in zip(cache, tokens)), diag


class _Digits:
    """Token i <-> character str(i); a leading space is token 10."""

    def encode_piece(self, text):
        return [10 if c == " " else int(c) for c in text]

    def decode(self, ids):
        return "".join(" " if i == 10 else str(i) for i in ids)


@pytest.mark.parametrize("rows", [
    # (first token, table as {fed: next}, answer, max new tokens): greedy == answer, then EOS
    [(10, {10: 1, 1: 2, 2: 3, 3: 11}, "123", 6)],
    # one row diverges at the second digit, the other agrees and stops early at its limit
    [(10, {10: 1, 1: 5, 5: 5, 2: 3, 3: 11}, "123", 6), (10, {10: 4, 4: 4}, "44", 2)],
    # wrong from the first token; greedy never reaches EOS
    [(7, {7: 7, 10: 1, 1: 2}, "12", 5)],
])
def test_greedy_rides_on_teacher_forcing(rows):
    """evaluate_batch's greedy outputs and answer log-probabilities equal separate greedy and
    teacher-forced decodes; shared steps are computed once."""
    import numpy as np

    from experiments.run_accuracy import evaluate_batch
    from experiments.tasks import Sample

    V, eos = 12, {11}
    table = np.full((len(rows), V), 9)
    for r, (_, nxt, _, _) in enumerate(rows):
        for a, b in nxt.items():
            table[r][a] = b
    ev = _TableModel(table, [first for first, _, _, _ in rows])
    samples = [Sample("passkey", (0, 0), (0, 0), (), (ans,), (), 0.5, n)
               for _, _, ans, n in rows]
    res = evaluate_batch(ev, samples, "inside", {("full", 1.0): None}, eos, _Digits())[0]
    tok = _Digits()
    for r, (first, _, ans, n) in enumerate(rows):
        out, t = [], first                      # plain greedy decode
        while t not in eos and len(out) < n:
            out.append(t)
            t = table[r][t]
        lp, prev = 0.0, None                    # plain teacher forcing
        for a in tok.encode_piece(" " + ans):
            z = np.asarray(ev._logits([first if prev is None else table[r][prev]])[0],
                           np.float64)
            lp += z[a] - np.log(np.exp(z).sum())
            prev = a
        got = res[r][("full", 1.0)]
        assert got["output"] == tok.decode(out)
        assert got["answer_logprob"] == pytest.approx(lp, abs=1e-5)
    if len(rows) == 1 and rows[0][2] == "123":   # all greedy steps shared with teacher forcing
        assert ev.steps == len(" 123")


def test_results_written_after_each_batch(tmp_path, monkeypatch, smollm2):
    """A run killed after its first batch leaves complete outputs for that batch (runs says
    1 of 2 samples), not nothing."""
    from experiments import run_accuracy

    # the session's SmolLM2 instead of a load per call (the CLI's own load: test_cli_*)
    monkeypatch.setattr("mpc_llama.loading.load_model", lambda name: smollm2)

    real, calls = run_accuracy.evaluate_batch, []

    def dies_second_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("killed")
        return real(*a, **k)

    monkeypatch.setattr(run_accuracy, "evaluate_batch", dies_second_time)
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        run_accuracy.main(["--tasks", "passkey", "--lengths", "160", "--samples", "2",
                           "--policies", "full", "--questions", "inside", "--batch", "1",
                           "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json",
                                                      "score.png"]
    res = json.loads((out / "results.json").read_text())
    assert res["runs"] == {"planned": 2, "done": 1}
    assert [row["n"] for row in res["rows"]] == [1] and len(res["samples"]) == 1
    # --resume runs only the missing sample and keeps the first one's records
    first = res["samples"]
    args = ["--tasks", "passkey", "--lengths", "160", "--samples", "2", "--policies", "full",
            "--questions", "inside", "--out", str(out), "--resume"]
    counted = []
    monkeypatch.setattr(run_accuracy, "evaluate_batch",
                        lambda ev, batch, *a: counted.append(len(batch)) or real(ev, batch, *a))
    run_accuracy.main(args)
    res = json.loads((out / "results.json").read_text())
    assert counted == [1] and res["runs"] == {"planned": 2, "done": 2}
    assert res["samples"][0] == first[0] and res["rows"][0]["n"] == 2
    assert len({s["depth"] for s in res["samples"]}) == 2 and len(res["command"]) == 2
    run_accuracy.main(args)  # nothing left: nothing runs
    assert counted == [1]
    with pytest.raises(ConfigError, match="settings differ.*samples 2 -> 3"):
        run_accuracy.main(args[:5] + ["3"] + args[6:])
    with pytest.raises(ConfigError, match="--resume needs --out"):
        run_accuracy.main(args[:-3] + ["--resume"])


@pytest.mark.slow   # a CLI over decode_step, which the default suite covers elsewhere
def test_decode_speed_script(tmp_path, monkeypatch, smollm2):
    """experiments/decode_speed.py runs (batch-1 rows through the harness's Evaluator)."""
    from experiments.decode_speed import main as speed_main

    monkeypatch.setattr("mpc_llama.loading.load_model", lambda name: smollm2)

    out = tmp_path / "speed.json"
    speed_main(["--length", "128", "--steps", "2", "--warmup", "1", "--policies",
                "full,mpcache", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["length"] == 128 and set(res["policies"]) == {"full", "mpcache"}
    assert all(len(p["all"]) == 2 and p["decode_s_per_token"] > 0
               for p in res["policies"].values())


def test_extra_budgets_only_for_the_named_policies():
    """--extra-budgets adds budgets to the --extra-policies only (one prompt pass feeds all);
    each flag without the other, or a policy not in --policies, is an error."""
    from experiments import run_accuracy

    def keys(*extra):
        args = run_accuracy.parse_args(["--tasks", "passkey", "--policies", "full,mpcache,quest",
                                        "--budgets", "0.1", *extra])
        return sorted(run_accuracy.build_setting(args)["policies"])

    assert keys() == [("full", 1.0), ("mpcache", 0.1), ("quest", 0.1)]
    assert keys("--extra-budgets", "0.05,0.2", "--extra-policies", "mpcache") == [
        ("full", 1.0), ("mpcache", 0.05), ("mpcache", 0.1), ("mpcache", 0.2), ("quest", 0.1)]
    for bad, match in ((["--extra-budgets", "0.05"], "go together"),
                       (["--extra-budgets", "0.05", "--extra-policies", "snapkv"], "not in"),
                       (["--extra-budgets", "1.5", "--extra-policies", "quest"], "in \\(0, 1\\]")):
        with pytest.raises(ConfigError, match=match):
            keys(*bad)


def test_pydoc_needles_prompts_have_the_length_and_the_needle(smollm2):
    """Needles in Python's documentation: every prompt is exactly --length tokens and holds
    its needle (code included) where the sample says."""
    from experiments import pydoc_needles

    tok = smollm2.tokenizer
    paras = pydoc_needles.paragraphs()
    assert len(paras) > 500
    for seed in (0, 7):
        s = pydoc_needles.sample(tok, paras, seed, 512)
        assert len(s.prompt_ids) == 512
        (lo, hi), = s.needle_spans
        assert s.answers[0] in tok.decode(s.prompt_ids[lo:hi])
    assert pydoc_needles._seeds("1-3,9") == [1, 2, 3, 9]
    with pytest.raises(ConfigError, match="--length"):
        pydoc_needles.main(["--length", "100"])


@pytest.mark.slow   # ~30 s: the harness's evaluator on two short prompts
def test_pydoc_needles_cli(tmp_path, smollm2, monkeypatch):
    import json

    from experiments import pydoc_needles

    monkeypatch.setattr("mpc_llama.loading.load_model", lambda name: smollm2)
    pydoc_needles.main(["--length", "384", "--seeds", "0-1", "--policies", "mpcache",
                        "--batch", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["score"]) == {"full", "mpcache"} and len(res["samples"]) == 4
    assert all(isinstance(r["found"], bool) and r["code"].isdigit() for r in res["samples"])
