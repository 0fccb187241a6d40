r"""Plaintext accuracy of every eviction policy, from the same JAX code the SPU benchmark
compiles, on a real model and long-context tasks.

    python experiments/run_accuracy.py --model smollm2 --tasks passkey,niah_single \
        --lengths 2048,4096 --policies all --budgets 0.05,0.1,0.2 --samples 20 --out runs/acc
    python experiments/run_accuracy.py --longbench path/to/LongBench/data \
        --longbench-tasks hotpotqa,qasper --samples 20 --lengths 4096 --out runs/lb
    python experiments/run_accuracy.py --longbench path/to/LongBench/data --samples 20 \
        --lengths 4096 --out runs/lb_all      # every supported dataset found in the directory
    python experiments/run_accuracy.py --tasks passkey --lengths 256 --samples 2 \
        --policies full,mpcache --budgets 0.2 --backend spu --protocol semi2k

One prefill per sample (chunked attention, jit reused across samples); every policy and budget
is applied to that same prefilled prompt (`mpc_llama.model.build_cache` runs each static step
on the stored per-layer q/k/v), then greedy decoding. Samples with equal prompt lengths run
as one batch (--batch; rows never interact); decode seconds per token = a batch step's
median / its rows. Metrics per (task, length, question protocol, policy, budget): task
score; relative to the full cache: teacher-forced answer log-probability, cosine of every
layer's attention output at the first answer step (mean and worst layer), fraction of needle
tokens attended at that step, attended fraction of the cache.
Question protocols: "inside" (the question ends the prompt; static steps see it) and "after"
(the cache is compressed at the end of the context; the question arrives afterwards).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.accuracy_results import (aggregate, load, print_summary,  # noqa: E402
                                          write_outputs)
from experiments.cli import Parser, run_main, write_json_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402

SYNTHETIC = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
             "common_words", "passphrase", "record")


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or HF directory")
    p.add_argument("--tasks", help="synthetic tasks (comma list; '' none); default: all of "
                   f"{','.join(SYNTHETIC)}, or none when --longbench is given")
    p.add_argument("--haystack", default="noise", help="haystack(s) of the synthetic tasks "
                   "(comma list of noise, varied, prose: each task runs on each); a task "
                   "written task@haystack in --tasks uses that one. Results name a task on a "
                   "haystack other than noise task@haystack")
    p.add_argument("--longbench", help="directory with LongBench's official *.jsonl files")
    p.add_argument("--longbench-tasks", default="", help="LongBench datasets (comma list); "
                   "default with --longbench: every supported dataset found in its directory")
    p.add_argument("--lengths", default="2048", help="prompt tokens (comma list); LongBench "
                   "contexts are cut in the middle to fit, as LongBench does")
    p.add_argument("--depths", default="", help="needle depths in [0,1] (comma list); default: "
                   "spread evenly over the samples")
    p.add_argument("--policies", default="all", help="comma list or 'all'; a policy's settings "
                   "as name:field=value[:field=value], e.g. mpcache:static_ratio=1.0")
    p.add_argument("--budgets", default="0.05,0.1,0.2", help="attended fractions (comma list)")
    p.add_argument("--extra-budgets", default="", help="more budgets (comma list) for the "
                   "policies named in --extra-policies only (on the same prompt passes)")
    p.add_argument("--extra-policies", default="", help="policies of --policies that also run "
                   "at --extra-budgets (comma list)")
    p.add_argument("--samples", type=int, default=4, help="samples per task and length")
    p.add_argument("--questions", default="inside,after",
                   help="question protocols: inside (in the prompt), after (after compression)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first synthetic sample")
    p.add_argument("--batch", type=int, default=10, help="samples decoded together (same "
                   "task, length and question protocol; rows never interact)")
    p.add_argument("--chunk", type=int, default=64, help="prefill attention chunk (queries)")
    p.add_argument("--backend", default="plain", choices=("plain", "spu"),
                   help="spu: private decoding of each sample; reports only its token "
                   "agreement with plaintext")
    p.add_argument("--protocol", default="semi2k", help="with --backend spu")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no new sample after this many minutes; the results then say "
                   "how many samples ran (0: no limit)")
    p.add_argument("--out", help="directory for results.json, results.csv and score.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same "
                   "settings; --batch and --max-minutes may differ): its samples are kept and "
                   "not run again")
    args = p.parse_args(argv)
    if args.tasks is None:  # resolved here, so results record (and --resume compares) the list
        args.tasks = "" if args.longbench else ",".join(SYNTHETIC)
    return args


def _list(text, conv, flag):
    try:
        return [conv(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: cannot parse {text!r}") from None


def build_setting(args):
    from eviction import POLICIES, VARIANTS, policy_from_spec
    from experiments import longbench
    from mpc_llama.loading import load_config

    tasks = task_haystacks(_list(args.tasks, str, "--tasks"),
                           _list(args.haystack, str, "--haystack"))
    lb_tasks = _list(args.longbench_tasks, str, "--longbench-tasks")
    if lb_tasks and not args.longbench:
        raise ConfigError("--longbench-tasks needs --longbench DIR")
    if args.longbench and not lb_tasks:
        lb_tasks = longbench.datasets_in(args.longbench)
    lb_data = {}
    for name in lb_tasks:
        lb_data[name] = longbench.load(args.longbench, name, args.samples)
    if not tasks and not lb_tasks:
        raise ConfigError("no tasks: give --tasks and/or --longbench-tasks")
    lengths = _list(args.lengths, int, "--lengths")
    cfg = load_config(args.model)
    for n in lengths:
        if n < 128:
            raise ConfigError(f"--lengths {n}: at least 128 tokens")
        if n + 200 > cfg.max_seq_len:
            raise ConfigError(f"--lengths {n} (+ question and answer) exceeds the model's "
                              f"context of {cfg.max_seq_len} tokens")
    budgets = _list(args.budgets, float, "--budgets")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ConfigError(f"budget {b} must be in (0, 1]")
    names = _list(args.policies, str, "--policies")
    if names == ["all"]:
        names = list(POLICIES) + sorted(VARIANTS)
    if "full" not in names:
        names.insert(0, "full")
    extra = _list(args.extra_budgets, float, "--extra-budgets")
    extra_names = _list(args.extra_policies, str, "--extra-policies")
    if bool(extra) != bool(extra_names):
        raise ConfigError("--extra-budgets and --extra-policies go together")
    if any(not 0.0 < b <= 1.0 for b in extra):
        raise ConfigError(f"--extra-budgets {args.extra_budgets}: budgets must be in (0, 1]")
    unknown = [n for n in extra_names if n not in names]
    if unknown:
        raise ConfigError(f"--extra-policies {','.join(unknown)}: not in --policies")
    policies = {}
    for name in names:
        more = [b for b in extra if b not in budgets] if name in extra_names else []
        for b in ([1.0] if name == "full" else sorted(budgets + more)):
            policies[(name, b)] = None if name == "full" else policy_from_spec(name, b)
    questions = _list(args.questions, str, "--questions")
    if not questions or any(q not in ("inside", "after") for q in questions):
        raise ConfigError("--questions takes inside and/or after")
    if args.samples < 1:
        raise ConfigError("--samples must be >= 1")
    depths = _list(args.depths, float, "--depths") or [
        (i + 0.5) / args.samples for i in range(args.samples)]
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError("--depths must be in [0, 1]")
    if args.batch < 1:
        raise ConfigError("--batch must be >= 1")
    if args.chunk < 16:
        raise ConfigError("--chunk must be >= 16")
    if args.max_minutes < 0:
        raise ConfigError("--max-minutes must be >= 0")
    if args.backend == "spu":
        from protocols.registry import get_protocol

        get_protocol(args.protocol)
    done, commands = resumed_records(args) if args.resume else ([], [])
    return {"tasks": tasks, "longbench": lb_data, "lengths": lengths, "budgets": budgets,
            "policies": policies, "questions": questions, "depths": depths, "done": done,
            "earlier_commands": commands}


def task_haystacks(tasks, haystacks):
    """--tasks and --haystack -> [(task, haystack)]: "task@haystack" as written, a bare task
    on each of `haystacks`."""
    from experiments.haystacks import HAYSTACKS

    for h in haystacks:
        if h not in HAYSTACKS:
            raise ConfigError(f"--haystack: unknown haystack {h!r}; choose from {HAYSTACKS}")
    if not haystacks:
        raise ConfigError("--haystack: give at least one haystack")
    out = []
    for t in tasks:
        name, at, hay = t.partition("@")
        if name not in SYNTHETIC:
            raise ConfigError(f"unknown task {name!r}; choose from {list(SYNTHETIC)}")
        if at and hay not in HAYSTACKS:
            raise ConfigError(f"--tasks {t}: unknown haystack {hay!r}; choose from {HAYSTACKS}")
        for h in ([hay] if at else haystacks):
            if (name, h) not in out:
                out.append((name, h))
    return out


def task_label(task, haystack):
    """The name results use: the task on noise (as before), else task@haystack."""
    return task if haystack == "noise" else f"{task}@{haystack}"


RESUME_FREE = ("batch", "max_minutes", "out", "resume")  # settings a resumed run may change


def resumed_records(args):
    """The per-sample records of the run in --out that --resume continues (checked to have
    the same settings, apart from RESUME_FREE)."""
    if not args.out:
        raise ConfigError("--resume needs --out DIR (the run to continue)")
    old = load(args.out)
    if "setting" not in old:
        raise ConfigError(f"--resume: {args.out} holds no run settings to continue")
    now = vars(args)
    # runs before --haystack: the noise; before --extra-budgets: none
    before = {"haystack": "noise", "extra_budgets": "", "extra_policies": "", **old["setting"]}
    diff = sorted(k for k in set(now) | set(before) if k not in RESUME_FREE
                  and now.get(k) != before.get(k))
    if diff:
        raise ConfigError(f"--resume: settings differ from the run in {args.out}: "
                          + ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                                      for k in diff))
    cmds = old["command"] if isinstance(old["command"], list) else [old["command"]]
    return old["samples"], cmds


def pending(jobs, records, questions):
    """(length, sample, question) still to run: those without records. Samples are told
    apart by task, length, question and depth, counted with multiplicity in job order (a
    group's batches run in order, so the done ones are its first)."""
    from collections import Counter

    done = Counter((r["task"], r["length"], r["question"], r["depth"])
                   for r in records if r["policy"] == "full")
    out = []
    for q in questions:
        for length, s in jobs:
            key = (s.task, length, q, s.depth)
            if done[key]:
                done[key] -= 1
            else:
                out.append((length, s, q))
    return out


# ---- samples ----

def spread_order(n):
    """0..n-1 in bit-reversed (van der Corput) order: every prefix spreads over the range, so
    a run cut short by --max-minutes still covers needle depths evenly."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def synthetic_samples(tokenizer, task, length, depths, n, seed, haystack="noise"):
    """n samples (seed + i at depth i), in spread_order, named task_label(task, haystack)."""
    import dataclasses

    from experiments.tasks import generate

    return [dataclasses.replace(generate(task, tokenizer, length, depths[i % len(depths)],
                                         seed + i, haystack), task=task_label(task, haystack))
            for i in spread_order(n)]


def longbench_samples(tokenizer, name, records, length):
    """LongBench records as Samples: prompt cut in the middle to `length` tokens (LongBench's
    truncation), chat-formatted for instruction models; "after" splits before the question
    text when the template has one."""
    from experiments import longbench
    from experiments.tasks import Sample

    out = []
    for rec in records:
        text = longbench.prompt_text(name, rec)
        ids = tokenizer.encode_piece(text)
        head_len = len(tokenizer.encode_start(tokenizer.chat_text("\u0000").split("\u0000")[0]))
        room = length - head_len - 8
        if len(ids) > room:
            half = room // 2
            text = tokenizer.hf.decode(ids[:half]) + tokenizer.hf.decode(ids[-(room - half):])
        prompt = tokenizer.chat(text)
        prompt = prompt[:length] if len(prompt) > length else prompt
        split = len(prompt) - min(len(prompt) // 4, 64)
        out.append(Sample(name, tuple(prompt), tuple(prompt[:split]), tuple(prompt[split:]),
                          tuple(rec["answers"]), (), -1.0, longbench.MAX_NEW_TOKENS[name]))
    return out


# ---- evaluation ----

class LayerJit:
    """`mpc_llama.model.decode_layer` jit-compiled per (policy, prompt length, diagnostics,
    reused selection's kind): a decode step is then 30 calls of ONE compiled layer (two where
    layers share selections) instead of a whole-model compile per policy and budget. The
    selection's kind and cluster size (Python values) travel outside the jitted function.
    The compiled layers are shared by every instance in a process (the key holds everything
    they depend on), so a second Evaluator or a test compiles nothing again."""

    _fns: dict = {}

    def __call__(self, lp, x, layer_cache, cache_length, positions, policy, prompt_len, cfg,
                 selection=None, diagnostics=False, select_now=True):
        import jax

        from mpc_llama.model import decode_layer

        meta_in = None if selection is None else (selection[0],) + tuple(selection[2:])
        key = (policy, prompt_len, cfg, diagnostics, meta_in, select_now)
        if key not in self._fns:
            meta_out = {}

            def run(lp, x, layer_cache, cache_length, positions, sel):
                sel = None if sel is None else (meta_in[0], sel) + meta_in[1:]
                x, layer_cache, sel, count, diag = decode_layer(
                    lp, x, layer_cache, cache_length, positions, policy, prompt_len, cfg, sel,
                    diagnostics, select_now)
                meta_out["meta"] = None if sel is None else (sel[0],) + tuple(sel[2:])
                return x, layer_cache, None if sel is None else sel[1], count, diag

            # the layer's cache is updated in place (donated): callers keep no reference
            # to a cache they pass (Evaluator.copy_cache when they need one)
            self._fns[key] = (jax.jit(run, donate_argnums=(2,)), meta_out)
        fn, meta_out = self._fns[key]
        x, layer_cache, sel, count, diag = fn(lp, x, layer_cache, cache_length, positions,
                                              None if selection is None else selection[1])
        meta = meta_out["meta"]
        return x, layer_cache, None if meta is None else (meta[0], sel) + meta[1:], count, diag


class Evaluator:
    """Jit-compiled prompt pass and cache builds, decode steps as per-layer jitted calls on a
    per-layer cache (`decode_step`'s layered form), all reused across samples (and, keyed by
    the config, across the instances of a process)."""

    _prompts: dict = {}
    _builds: dict = {}

    def __init__(self, model, chunk):
        import jax

        from mpc_llama.model import (build_cache, decode_step, device_params, embed, lm_head,
                                     prompt_layer, split_layers)

        self.model, self.cfg = model, model.cfg
        self.params = device_params(model.params)  # numpy arguments convert on every call
        cfg = self.cfg
        self.layer_params = split_layers(self.params, model.cfg.n_layers)
        if cfg.tie_embeddings:  # the LM head runs eagerly: transpose the tied table once
            self.layer_params["lm_head"] = jax.device_put(model.params["embed"].T.copy())
            self.step_cfg = cfg.replace(tie_embeddings=False)
        else:
            self.step_cfg = cfg
        # the prompt pass as ONE compiled layer called per layer (as the decode steps): a
        # whole-model jit unrolls 30 layers of banded attention (minutes to compile at 8k)
        key = (cfg, chunk)
        if key not in self._prompts:
            self._prompts[key] = (
                jax.jit(lambda p, t: embed(p, t, cfg)),
                jax.jit(lambda lp, x: prompt_layer(lp, x, cfg, chunk)),
                jax.jit(lambda p, x: lm_head(p, x[:, -1], cfg)))
        self._prompt = self._prompts[key]
        self._layer = LayerJit()
        self._jax = jax
        self.build_cache, self.decode_step = build_cache, decode_step

    def prompt(self, ids):
        """ids: [b][t] token ids (equal lengths) -> (last logits [b, V], per-layer q/k/v)."""
        import jax.numpy as jnp

        embed_fn, layer_fn, head_fn = self._prompt
        x, layers = embed_fn(self.params, jnp.asarray(ids, jnp.int32)), []
        for lp in self.layer_params["layers"]:
            x, out = layer_fn(lp, x)
            layers.append(out)
        return head_fn(self.params, x), layers

    def cache(self, layers, capacity, policy):
        """The policy's cache from a prompt pass, in decode_step's per-layer form."""
        cfg, build_cache = self.cfg, self.build_cache
        key = (cfg, capacity, policy, tuple(layers[0][1].shape))
        if key not in self._builds:
            self._builds[key] = self._jax.jit(
                lambda lay: _unstack(build_cache(cfg, lay, capacity, policy,
                                                 compaction="index")))
        return self._builds[key](layers)

    def copy_cache(self, cache):
        """A copy of a cache (`step` updates the cache it is given in place)."""
        return self._jax.tree_util.tree_map(lambda a: a.copy(), cache)

    def step(self, tokens, position, cache, policy, prompt_len, last_input=0):
        """tokens: [b] ids, one per row, all at `position`; `cache` is consumed (donated).
        last_input: the decode step that reads the last question token (policy.selects_at)."""
        import jax.numpy as jnp

        now = policy is None or policy.selects_at(position - prompt_len, last_input)
        return self.decode_step(self.layer_params, self.step_cfg, jnp.asarray(tokens, jnp.int32),
                                jnp.asarray(position, jnp.int32), cache, policy, prompt_len,
                                diagnostics=True, layer_fn=self._layer, select_now=now)


def _unstack(cache):
    """KVCache with k, v, pos and each bounds part as per-layer tuples."""
    def split(a):
        return tuple(a[i] for i in range(a.shape[0]))
    bounds = None if cache.bounds is None else tuple(split(b) for b in cache.bounds)
    return cache.replace(k=split(cache.k), v=split(cache.v), pos=split(cache.pos), bounds=bounds)


def evaluate_batch(ev, samples, question, policies, eos_ids, tokenizer):
    """Every policy on a batch of samples whose prompts (and, for "after", questions) have equal
    lengths: one batched prompt pass, then each policy's cache and decode steps for all rows at
    once (rows never interact; the dense layers read their weights once per step for the whole
    batch). Returns one {(name, budget): metrics} per sample, the prompt pass seconds per
    sample, and {(name, budget): decode seconds per token (median batch step / rows)}."""
    import numpy as np

    rows = len(samples)
    ids = [s.prompt_ids if question == "inside" else s.context_ids for s in samples]
    feed = [() if question == "inside" else s.question_ids for s in samples]
    if len({len(i) for i in ids}) > 1 or len({len(f) for f in feed}) > 1:
        raise ValueError("a batch needs prompts and questions of equal lengths")
    t0 = time.perf_counter()
    logits0, layers = ev.prompt([list(i) for i in ids])
    logits0.block_until_ready()
    prefill_s = (time.perf_counter() - t0) / rows
    answers = [tokenizer.encode_piece(" " + s.answers[0]) for s in samples]
    new_tokens = max(s.max_new_tokens for s in samples)
    prompt_len = len(ids[0])
    capacity = prompt_len + len(feed[0]) + max(new_tokens, max(map(len, answers))) + 1
    pad = min(eos_ids)
    results, timing = [{} for _ in samples], {}
    for key, policy in policies.items():
        cache = ev.cache(layers, capacity, policy)
        logits, pos = logits0, prompt_len
        last = max(len(feed[0]) - 1, 0)   # the step that reads the question's last token
        for j in range(len(feed[0])):  # question after compression, teacher-forced
            logits, cache, _ = ev.step([f[j] for f in feed], pos, cache, policy, prompt_len,
                                       last)
            pos += 1
        # teacher-forced log-probability of each reference answer (padded to the longest);
        # greedy decoding rides along while every unfinished row's greedy token is its
        # reference token (the same step: computed once) and goes on alone from the first step
        # where one differs. A row that emitted EOS is done (its later tokens are ignored).
        outs, done, step_times = [[] for _ in samples], [False] * rows, []
        lp, first_diag, start_pos = np.zeros(rows), None, pos
        riding, fork = True, None  # fork: greedy's state after its last shared step
        for j in range(max(map(len, answers))):
            z = np.asarray(logits, np.float64)
            logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            toks = [a[j] if j < len(a) else pad for a in answers]
            lp += [z[r, t] - logz[r] if j < len(answers[r]) else 0.0
                   for r, t in enumerate(toks)]
            shared = False
            if riding:
                if j >= new_tokens:
                    riding, fork = False, None
                else:
                    greedy = np.argmax(z, axis=-1)
                    ends = _greedy_done(greedy, done, outs, samples, eos_ids)
                    if all(ends):
                        _greedy_commit(greedy, ends, outs)
                        done, riding, fork = ends, False, None
                    elif all(e or int(g) == t for g, e, t in zip(greedy, ends, toks)):
                        _greedy_commit(greedy, ends, outs)
                        done, shared = ends, True
                    else:  # the steps donate their cache: keep a copy for greedy
                        riding, fork = False, (j, logits, ev.copy_cache(cache), pos)
            t1 = time.perf_counter()
            logits, cache, diag = ev.step(toks, pos, cache, policy, prompt_len, last)
            first_diag = first_diag or diag
            pos += 1
            if shared:
                logits.block_until_ready()
                step_times.append(time.perf_counter() - t1)
        if riding:  # the reference answers ended first
            fork = (max(map(len, answers)), logits, cache, pos)
        if fork is not None:  # greedy goes on alone from its first step of its own
            j0, logits, cache, pos = fork
            for _ in range(j0, new_tokens):
                greedy = np.argmax(np.asarray(logits), axis=-1)
                done = _greedy_done(greedy, done, outs, samples, eos_ids)
                _greedy_commit(greedy, done, outs)
                if all(done):
                    break
                t1 = time.perf_counter()
                logits, cache, _ = ev.step([int(t) if not d else pad
                                            for t, d in zip(greedy, done)], pos, cache,
                                           policy, prompt_len, last)
                logits.block_until_ready()
                step_times.append(time.perf_counter() - t1)
                pos += 1
        # the first step of a shape may compile: time the later ones
        timing[key] = float(np.median(step_times[1:])) / rows if len(step_times) > 1 else None
        d = {k: np.asarray(v) for k, v in first_diag.items()}
        attended = (d["attended_pos"] >= 0).sum(axis=-1)            # [L, b, K]
        for r, s in enumerate(samples):
            results[r][key] = {
                "output": tokenizer.decode(outs[r]), "answer_logprob": float(lp[r]),
                "attn_out": d["attn_out"][:, r],
                "attended_fraction": float(attended[:, r].mean() / (start_pos + 1)),
                "needle_fraction": _needle_fraction(d["attended_pos"][:, r], s.needle_spans)}
    for res in results:
        ref = res[next(k for k in res if k[0] == "full")]
        b = ref["attn_out"]                                        # [L, N*D]
        for r in res.values():
            a = r.pop("attn_out")
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
                                     + 1e-9)
            r["attn_cosine"] = float(cos.mean())
            r["attn_cosine_worst_layer"] = float(cos.min())
        for r in res.values():
            r["logprob_vs_full"] = r["answer_logprob"] - ref["answer_logprob"]
    return results, prefill_s, timing


def _greedy_done(greedy, done, outs, samples, eos_ids):
    """Rows done after greedy tokens `greedy` [b]: done before, EOS now, or at their limit."""
    return [d or int(g) in eos_ids or len(o) >= s.max_new_tokens
            for g, d, o, s in zip(greedy, done, outs, samples)]


def _greedy_commit(greedy, done, outs):
    """Appends each unfinished row's greedy token to its output."""
    for g, d, o in zip(greedy, done, outs):
        if not d:
            o.append(int(g))


def batches(samples, question, size):
    """Batches of at most `size` samples with equal prompt (and question) lengths: samples
    grouped by length (groups in order of first appearance, order kept inside a group)."""
    groups = {}
    for s in samples:
        groups.setdefault(len(s.prompt_ids if question == "inside" else s.context_ids),
                          []).append(s)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _needle_fraction(attended_pos, spans):
    """Fraction of needle token positions attended, over layers and KV heads (None if the
    sample has no needles)."""
    import numpy as np

    if not spans:
        return None
    needles = np.concatenate([np.arange(a, b) for a, b in spans])
    hit = np.isin(attended_pos, needles).sum(axis=-1)              # [L, b, K]
    return float(hit.mean() / len(needles))


def score_output(sample, text):
    from experiments import longbench, tasks

    if sample.task in longbench.PROMPTS:
        return longbench.score_prediction(sample.task, text, {"answers": list(sample.answers),
                                                              "all_classes": []})
    return tasks.score(sample.task, text, sample.answers)


def platform_info():
    """Where the numbers came from: JAX version, backend and device, matmul precision."""
    import platform

    import jax

    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "host_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "matmul_precision": str(jax.config.jax_default_matmul_precision)}


# ---- MPC fidelity ----

def spu_agreement(args, model, samples, policies):
    """Private greedy decoding (SPU) of each sample and policy vs plaintext: same tokens?"""
    from mpc_llama.generation import greedy_generate
    from protocols.private_generation import PrivateGenerator
    from protocols.registry import get_protocol
    from protocols.session import SpuSession

    protocol = get_protocol(args.protocol).with_numerics("FM128", 30)
    out = []
    for sample in samples:
        for (name, budget), policy in policies.items():
            n = min(sample.max_new_tokens, 4)
            plain = greedy_generate(model.params, model.cfg, list(sample.prompt_ids), n,
                                    policy=policy).tokens
            gen = PrivateGenerator(SpuSession(protocol), model.cfg, model.params, policy=policy)
            private = gen.generate(list(sample.prompt_ids), n).tokens
            out.append({"task": sample.task, "policy": name, "budget": budget,
                        "plain": plain, "spu": private, "agree": plain == private})
    return out


def main(argv=None):
    import numpy as np
    from tqdm import tqdm

    from mpc_llama.loading import load_model

    args = parse_args(argv)
    setting = build_setting(args)
    model = load_model(args.model)
    tok = model.tokenizer
    jobs = []
    for length in setting["lengths"]:
        for task, haystack in setting["tasks"]:
            for s in synthetic_samples(tok, task, length, setting["depths"], args.samples,
                                       args.seed, haystack):
                jobs.append((length, s))
        for name, recs in setting["longbench"].items():
            for s in longbench_samples(tok, name, recs, length):
                jobs.append((length, s))
    if args.backend == "spu":
        agreement = spu_agreement(args, model, [s for _, s in jobs], setting["policies"])
        for a in agreement:
            print(f"{a['task']:<18}{a['policy']:<18}{a['budget']:>6.2f}  plain {a['plain']} "
                  f"spu {a['spu']}  {'same' if a['agree'] else 'DIFFERENT'}")
        rate = float(np.mean([a["agree"] for a in agreement]))
        print(f"SPU ({args.protocol}, FM128/30 bits) agrees with plaintext on "
              f"{rate:.0%} of {len(agreement)} runs")
        if args.out:
            write_json_atomic(os.path.join(args.out, "spu_agreement.json"),
                              {"runs": agreement, "agreement": rate})
        return
    ev = Evaluator(model, args.chunk)
    eos = set(tok.eos_ids)
    records, prefill_times = list(setting["done"]), {}
    planned = len(jobs) * len(setting["questions"])
    # batches of samples of one task, length and question protocol, in spread order
    groups = {}
    for length, s, q in pending(jobs, records, setting["questions"]):
        groups.setdefault((length, s.task, q), []).append(s)
    def interleave(lists):
        return [w for ws in itertools.zip_longest(*lists) for w in ws if w is not None]

    # the protocols' batches alternate, and the tasks' (a run cut short stays balanced)
    by_task = {}
    for (length, task, q), ss in groups.items():
        by_task.setdefault((length, task), []).append([(length, b, q)
                                                       for b in batches(ss, q, args.batch)])
    work = interleave([interleave(qs) for qs in by_task.values()])
    done = planned - sum(len(b) for _, b, _ in work)
    if done:
        print(f"--resume: {done} of {planned} samples done in {args.out}", file=sys.stderr)
    started = time.monotonic()
    bar = tqdm(total=planned, initial=done, desc="samples", unit="sample", file=sys.stderr)
    for i, (length, batch, question) in enumerate(work):
        # the first batch always starts (at minute 0), so a limited run makes progress
        if i and args.max_minutes and time.monotonic() - started > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes}: stopping after {done} of {planned} "
                  "samples", file=sys.stderr)
            break
        res, prefill_s, timing = evaluate_batch(ev, batch, question, setting["policies"], eos,
                                                tok)
        prefill_times.setdefault(length, []).append(prefill_s)
        for sample, r_sample in zip(batch, res):
            for (name, budget), r in r_sample.items():
                records.append({"task": sample.task, "length": length, "question": question,
                                "policy": name, "budget": budget, "depth": sample.depth,
                                "score": score_output(sample, r["output"]),
                                "decode_s_per_token": timing[(name, budget)], **r})
        done += len(batch)
        bar.update(len(batch))
        if args.out and done < planned:  # a run killed later keeps what it measured
            write_outputs(args.out, _payload(args, argv, records, prefill_times, planned, done,
                                              setting["earlier_commands"]))
    bar.close()
    payload = _payload(args, argv, records, prefill_times, planned, done,
                       setting["earlier_commands"])
    print_summary(payload["rows"])
    print("prefill seconds (first includes jit compilation):", payload["prefill"])
    if args.out:
        write_outputs(args.out, payload)
        print(f"wrote {args.out}/results.json, results.csv, score.png")


def _payload(args, argv, records, prefill_times, planned, done, earlier_commands=()):
    """results.json's content for the samples run so far (`runs` says how many); `command`
    lists every command of a resumed run (prefill times are this command's)."""
    import numpy as np

    times = {str(n): {"prefill_s_first": t[0], "prefill_s_median_after_first":
                      float(np.median(t[1:])) if len(t) > 1 else None}
             for n, t in prefill_times.items()}
    command = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    return {"command": [*earlier_commands, command] if earlier_commands else command,
            "model": args.model, "rows": aggregate(records), "samples": records,
            "prefill": times, "runs": {"planned": planned, "done": done},
            "platform": platform_info(), "setting": {k: v for k, v in vars(args).items()}}


if __name__ == "__main__":
    run_main(main)
