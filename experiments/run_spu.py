r"""Private decoding benchmark: one decode step with a KV cache of --seq prompt tokens, per
eviction policy, under an SPU protocol, composed from blocks measured at the model's real
dimensions, with projected latency for named network profiles.

    python experiments/run_spu.py --protocol cheetah --seq 8192
    python experiments/run_spu.py --protocol aby3 --seq 1024,2048,4096,8192 --policies all \
        --out runs/aby3
    python experiments/run_spu.py --model smollm2 --protocol semi2k --seq 1024 --bandwidth 200 \
        --rtt 20
    python experiments/run_spu.py --reproject results/cheetah_8192/results.json --out DIR

How the numbers are made (printed with every run, recorded in the JSON):
  * every block kind of a decode step (protocols.blocks) runs under SPU on its own: dense
    blocks (embedding, norms, projections, MLP, LM head, argmax) at the real dimensions,
    attention blocks (bounds, selection, scores, gather, softmax, scatter, p.V) on --heads KV
    heads, extrapolated linearly to the model's KV heads when it has more; the step is the sum
    of each block times the layers that run it (selecting and sharing layers counted apart);
  * every party's bytes and sends are measured (3PC: all parties in one run, each counter
    ranked on its own, largest first, as SPU's log has no ranks); compute_s is the
    simulator's wall-clock with all parties as threads on this machine;
  * latency is PROJECTED from those counters by protocols.network.projected_seconds;
    CHEETAH's silent-OT refill sends (protocols.refill) are priced apart, not as round trips
    (`refills`, `refill_sends` per row and block);
  * `oracle` attends exactly the budget with selection left out (the floor at that budget);
  * the one-time static step at prefill and CHEETAH's one-time setup are reported apart.
Measured blocks are cached on disk (--block-cache), keyed by program text and protocol.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.cli import Parser, run_main, write_json_atomic, write_outputs_atomic  # noqa: E402
from mpc_llama.errors import ConfigError  # noqa: E402

DEFAULT_NETWORKS = "lan,wan,puma_llama,ditto_wan,bumblebee_wan,secretflow_wan"
TABLE_NETWORKS = ("lan", "wan")


def _ints(text: str, flag: str, lo: int):
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < lo for v in vals):
        raise ConfigError(f"{flag} values must be integers >= {lo}, got {text!r}")
    return vals


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model", default="llama-2-7b",
                   help="preset (llama-2-7b, llama-3.1-8b, smollm2-135m, tiny), 'smollm2', a "
                        ".gguf file or an HF directory (only the architecture is read)")
    p.add_argument("--protocol", default="cheetah", help="cheetah | semi2k | aby3")
    p.add_argument("--seq", default="8192", help="prompt tokens in the cache (comma list)")
    p.add_argument("--policies", default="full,mpcache",
                   help="comma list of policies, or 'all' (oracle is always added as the "
                        "free-selection reference unless --no-oracle); settings as "
                        "name:field=value[:field=value], e.g. mpcache:static_ratio=1.0")
    p.add_argument("--no-oracle", action="store_true", help="do not add the oracle policy")
    p.add_argument("--budget", type=float, default=0.1, help="attended fraction of the prompt")
    p.add_argument("--heads", default="auto",
                   help="KV-head counts measured for attention blocks (extrapolated linearly "
                        "to the model's when it has more); auto: the model's own (no "
                        "extrapolation; CHEETAH at 8k, 7B shapes: ~13 minutes from an empty "
                        "block cache for full, mpcache, oracle); e.g. 2,4: a quicker CHEETAH "
                        "run whose compute seconds are extrapolated (noisy)")
    p.add_argument("--static-heads", default="1,2",
                   help="KV-head counts measured for the static step (extrapolated linearly)")
    p.add_argument("--static-max-seq", type=int, default=1024,
                   help="longest prompt at which the static step is measured directly; "
                        "beyond, it is extrapolated from 1/4, 1/2 and 1 x this (bytes and "
                        "seconds: least squares a*T + b*T^2; sends: the longest's)")
    p.add_argument("--networks", default=DEFAULT_NETWORKS,
                   help="comma list of profiles from protocols.network.PROFILES")
    p.add_argument("--bandwidth", type=float, help="custom profile: bandwidth in Mbit/s")
    p.add_argument("--rtt", type=float, help="custom profile: round-trip time in ms")
    p.add_argument("--no-beaver-cache", action="store_true",
                   help="semi2k: open weights and KV rows at every use (no Beaver cache)")
    p.add_argument("--exact-mul", action="store_true",
                   help="cheetah: multiplications without the last-bit error (SPU's default)")
    p.add_argument("--field", help="FM64 or FM128 (default: the protocol's)")
    p.add_argument("--fxp-bits", type=int, help="fixed-point fraction bits")
    p.add_argument("--block-cache", default="runs/block_cache",
                   help="directory of cached block measurements ('' disables)")
    p.add_argument("--out", help="directory for results.json, results.csv and plots")
    p.add_argument("--parties", help="parties file (JSON): measure every block on real parties "
                   "over brpc, one process each (protocols/party.py), instead of the simulator; "
                   "compute seconds are then those of real processes")
    p.add_argument("--party-logs", help="directory for the logs of locally started parties")
    p.add_argument("--no-spawn", action="store_true",
                   help="start no parties here: all are already running protocols.party")
    p.add_argument("--reproject", metavar="RESULTS_JSON",
                   help="measure nothing: re-project an earlier results.json's blocks with "
                        "today's cost model (refills read from each block's counters), "
                        "writing --out")
    return p.parse_args(argv)


def build_setting(args):
    """Validates everything before any measurement. Returns a dict of the run's setting."""
    from eviction import POLICIES, VARIANTS, policy_from_spec
    from eviction.compaction import for_protocol
    from mpc_llama.loading import load_config
    from protocols.network import custom_profile, get_profile
    from protocols.private_generation import spu_config
    from protocols.registry import get_protocol

    protocol = get_protocol(args.protocol)
    if args.field or args.fxp_bits is not None:
        protocol = protocol.with_numerics(args.field, args.fxp_bits)
    if args.no_beaver_cache:
        protocol = protocol.without_beaver_cache()
    if args.exact_mul:
        protocol = protocol.without_mul_lsb_error()
    seqs = _ints(args.seq, "--seq", 64)
    heads = None if args.heads == "auto" else _ints(args.heads, "--heads", 1)
    static_heads = _ints(args.static_heads, "--static-heads", 1)
    if not 0.0 < args.budget <= 1.0:
        raise ConfigError(f"--budget must be in (0, 1], got {args.budget}")
    if args.static_max_seq < 256:
        raise ConfigError("--static-max-seq must be >= 256")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if names == ["all"]:
        names = list(POLICIES) + sorted(VARIANTS)
    if not names:
        raise ConfigError("--policies is empty")
    if "full" not in names:
        names.insert(0, "full")  # every reduction is relative to it
    if not args.no_oracle and "oracle" not in names:
        names.append("oracle")
    policies = {n: None if n == "full" else
                for_protocol(policy_from_spec(n, args.budget), protocol.kind) for n in names}
    for n, pol in policies.items():
        if getattr(pol, "gather", "scores") != "scores":
            raise ConfigError(f"policy {n}: cost blocks need gather='scores'")
    networks = [get_profile(n.strip()) for n in args.networks.split(",") if n.strip()]
    if (args.bandwidth is None) != (args.rtt is None):
        raise ConfigError("--bandwidth and --rtt go together")
    if args.bandwidth is not None:
        networks.append(custom_profile(args.bandwidth, args.rtt))
    cfg = spu_config(load_config(args.model))
    if heads is None:
        heads = [cfg.n_kv_heads]
    for flag, hs in (("--heads", heads), ("--static-heads", static_heads)):
        if cfg.n_kv_heads > max(hs) and len(set(hs)) < 2:
            raise ConfigError(f"the model has {cfg.n_kv_heads} KV heads: give {flag} two "
                              "counts to extrapolate from (e.g. 2,4) or at least that many")
    from eviction.compaction import fold_for
    from protocols.benchmark import head_samples
    for n, pol in policies.items():   # folded heads: a cost linear in heads needs multiples
        fold = max(1, getattr(pol, "fold_heads", 1))
        counts = head_samples(cfg.n_kv_heads, heads) + [cfg.n_kv_heads]
        if any(fold_for(h, fold) != fold_for(cfg.n_kv_heads, fold) for h in counts):
            raise ConfigError(f"policy {n} folds {fold} KV heads per one-hot matmul: measure "
                              f"--heads in multiples of {fold} (the model has "
                              f"{cfg.n_kv_heads}), or set {n}:fold_heads=1")
    notes = []
    if max(seqs) > cfg.max_seq_len:
        notes.append(f"--seq {max(seqs)} exceeds the model's context ({cfg.max_seq_len}): "
                     "costs are for the shapes only")
    if max(seqs) > cfg.max_seq_len and cfg.max_seq_len < 1024:
        raise ConfigError(f"--seq {max(seqs)} is far beyond the model's context")
    return {"protocol": protocol, "seqs": seqs, "heads": heads, "static_heads": static_heads,
            "policies": policies,
            "networks": networks, "cfg": cfg, "notes": notes}


def static_block(policy, seq: int) -> int:
    """The policy's `static_block` where its static step at `seq` ranks inside blocks (a
    block plan), else 0."""
    from eviction.static_step import block_plan

    return policy.static_block if policy is not None and block_plan(policy, seq) else 0


def plan(setting, args):
    """Every (key, block-variant dict) to compose: ("dense",), ("decode", seq, policy),
    ("static", seq, policy) -> {variant: blocks}; variant = KV heads or (seq, heads)."""
    from protocols.benchmark import head_samples, static_lengths
    from protocols.blocks import attention_blocks, dense_blocks, static_blocks

    cfg = setting["cfg"]
    hs = head_samples(cfg.n_kv_heads, setting["heads"])
    shs = head_samples(cfg.n_kv_heads, setting["static_heads"])
    jobs = {("dense",): {None: dense_blocks(cfg)}}
    for seq in setting["seqs"]:
        for name, pol in setting["policies"].items():
            jobs[("decode", seq, name)] = {h: attention_blocks(cfg, pol, seq, h) for h in hs}
            lengths = static_lengths(seq, args.static_max_seq, static_block(pol, seq))
            static = {(t, h): static_blocks(cfg, pol, t, h) for t in lengths for h in shs}
            if any(static.values()):
                jobs[("static", seq, name)] = static
    return jobs, hs


def measure_all(meter, jobs):
    """Measures every block once (identical blocks, e.g. the dense ones, are shared) with a
    progress bar. Returns {key: {variant: [(block, counters)]}}; with SEMI2K's Beaver cache
    the counters are steady, and key ("one-time",) + key holds each block's one-time
    openings the same way."""
    from tqdm import tqdm

    total = sum(len(b) for variants in jobs.values() for b in variants.values())
    out = {}
    with tqdm(total=total, desc="measuring blocks", unit="block", file=sys.stderr) as bar:
        for key, variants in jobs.items():
            out[key], once = {}, {}
            for variant, blocks in variants.items():
                measured, opened = [], []
                for block in blocks:
                    bar.set_postfix_str(f"{key[0]} {'/'.join(map(str, key[1:]))} {block.name}")
                    measured.append((block, meter.measure(block)))
                    if meter.last_one_time is not None:
                        opened.append((block, meter.last_one_time))
                    bar.update()
                out[key][variant] = measured
                once[variant] = opened
            if any(once.values()):
                out[("one-time",) + key] = once
    return out


def latency(c, protocol, networks):
    from protocols.network import projected_seconds

    return {n.name: projected_seconds(c.seconds, c.bytes_sent, c.sends, n, protocol.kind,
                                      refill_sends=c.refill_sends)
            for n in networks}


def refill_fields(c, blocks=None) -> dict:
    """`refills` (in REFILL_SENDS units of the busiest party) and per-party `refill_sends`."""
    from protocols.refill import REFILL_SENDS

    out = {"refill_sends": [round(r) for r in c.refills],
           "refills": round(max(c.refills) / REFILL_SENDS, 1)}
    return out


def make_rows(setting, measured, hs, args):
    from protocols.benchmark import compose_static, compose_step, total

    protocol, cfg, networks = setting["protocol"], setting["cfg"], setting["networks"]
    world = protocol.world_size
    dense = compose_step(measured[("dense",)], cfg.n_kv_heads)
    rows = []
    for seq in setting["seqs"]:
        for name, pol in setting["policies"].items():
            attn = compose_step(measured[("decode", seq, name)], cfg.n_kv_heads)
            once_key = ("one-time", "decode", seq, name)
            once_attn = compose_step(measured[once_key], cfg.n_kv_heads) \
                if once_key in measured else {}
            # compact rows re-opened after each refresh: twice per refresh (the selecting step
            # multiplies the new rows, the next step marks them), per step, not once
            reopened = {n: (b, c) for n, (b, c) in once_attn.items() if b.reopened_every}
            for n, (b, c) in reopened.items():
                attn[n] = (attn[n][0], attn[n][1] + c.scale(2.0 / b.reopened_every))
            blocks = {**dense, **attn}
            step, att = total(blocks, world), total(attn, world)
            cats = {}
            for block, c in blocks.values():
                cats[block.category] = cats.get(block.category, 0.0) + c.total_bytes
            row = {
                "policy": name, "protocol": protocol.name, "field": protocol.field,
                "seq": seq, "budget": None if pol is None else pol.budget,
                "attended": seq if pol is None else pol.n_attend(seq),
                "retained": seq if pol is None or pol.static_keep(seq) is None
                else pol.static_keep(seq),
                "bytes": step.total_bytes, "bytes_per_party": list(step.bytes_sent),
                "sends": round(max(step.sends)), "sends_per_party": list(step.sends),
                "compute_s": step.seconds,
                "attention_bytes": att.total_bytes, "attention_sends": round(max(att.sends)),
                "attention_compute_s": att.seconds,
                "latency_s": latency(step, protocol, networks),
                "attention_latency_s": latency(att, protocol, networks),
                **refill_fields(step),
                "attention_refill_sends": [round(r) for r in att.refills],
                "bytes_by_category": cats,
                "blocks": {n: {"category": b.category, "count": b.count,
                               **({"every": b.every} if b.every > 1 else {}), **c.to_json()}
                           for n, (b, c) in blocks.items()},
            }
            sel = selecting_step(blocks, {n: b.every for n, (b, _) in blocks.items()},
                                 world, protocol, networks,
                                 {n: c.scale(1.0 - 2.0 / b.reopened_every)
                                  for n, (b, c) in reopened.items()})
            if sel:
                row["selecting_step"] = sel
            if reopened:
                kept_open = total(reopened, world)
                row["kept_rows_opening"] = {
                    "bytes": kept_open.total_bytes, "sends": round(max(kept_open.sends)),
                    "what": "SEMI2K: the compact rows' Beaver opening (all layers), made twice "
                            "per refresh (the selecting step multiplies the new rows, the next "
                            "step marks them for the cache) and counted 2/refresh in the mean "
                            "step"}
            once = {k: total(compose_step(measured[k], cfg.n_kv_heads), world)
                    for k in (("one-time", "dense"),) if k in measured}
            if once_attn:   # a block run every r steps still opens every layer's rows once
                once[once_key] = total({n: (b, c.scale(b.every)) for n, (b, c)
                                        in once_attn.items() if n not in reopened}, world)
            if once:  # SEMI2K's Beaver cache: fixed operands' openings, not in the step
                row["one_time_openings"] = {
                    "weights_bytes": once[("one-time", "dense")].total_bytes
                    if ("one-time", "dense") in once else 0.0,
                    "kv_rows_bytes": once[("one-time", "decode", seq, name)].total_bytes
                    if ("one-time", "decode", seq, name) in once else 0.0,
                    "what": "weights: once per session (first use); KV rows: each once, when "
                            "first multiplied (here the prompt's, at the first decode step)"}
            key = ("static", seq, name)
            if key in measured:
                blocked = bool(static_block(pol, seq))
                st = total(compose_static(measured[key], seq, cfg.n_kv_heads, blocked), world)
                lengths = sorted({t for t, _ in measured[key]})
                row["static_prefill"] = {
                    "bytes": st.total_bytes, "sends": round(max(st.sends)), "compute_s": st.seconds,
                    "latency_s": latency(st, protocol, networks),
                    "measured_at_seq": lengths,
                    "extrapolated": None if lengths == [seq] else
                    f"from prompts of {lengths} tokens: bytes and seconds by least squares "
                    + ("a + b*T, sends in proportion to T (ranked inside blocks)" if blocked else
                       "a*T + b*T^2, sends those of the longest")}
            rows.append(row)
    add_reductions(rows)
    return rows


def selecting_step(blocks, every, world, protocol, networks, extra=None):
    """A kept selection's decode step that selects afresh, or None: blocks {name: (block,
    counters per step)}, every {name: the block runs once every that many steps}; those
    blocks counted in full instead of their per-step share. extra {name: counters}: what the
    selecting step adds to a block beyond its per-step figure (SEMI2K: the new compact rows'
    opening, of which the mean step counts 2/refresh)."""
    from protocols.benchmark import total

    if all(every.get(n, 1) == 1 for n in blocks):
        return None
    full = {n: (b, c.scale(every.get(n, 1)) + (extra or {}).get(n, c.scale(0.0)))
            for n, (b, c) in blocks.items()}
    sel = total(full, world)
    att = total({n: v for n, v in full.items() if n not in DENSE_BLOCKS}, world)
    return {"bytes": sel.total_bytes, "sends": round(max(sel.sends)), "compute_s": sel.seconds,
            "latency_s": latency(sel, protocol, networks),
            "attention_latency_s": latency(att, protocol, networks),
            "what": "a decode step that selects afresh (every `refresh` steps, and every step of "
                    "the `warmup`): the kept-selection blocks counted in full; the row's own "
                    "figures are the mean step over `refresh` steps"}


def add_reductions(rows) -> None:
    for row in rows:
        full = next(r for r in rows if r["seq"] == row["seq"] and r["policy"] == "full")
        red = {"bytes": full["bytes"] / row["bytes"],
               "attention_bytes": full["attention_bytes"] / row["attention_bytes"]}
        red.update({n: full["latency_s"][n] / row["latency_s"][n] for n in row["latency_s"]})
        row["reduction_vs_full"] = red


# protocols.blocks.dense_blocks: the rest of a step's blocks are the attention modules'
DENSE_BLOCKS = ("embed", "attn_norm", "qkv", "o_proj", "mlp_norm", "gate_up", "gated", "down",
                "final_norm", "lm_head", "argmax")


def reproject(payload: dict, networks) -> dict:
    """An earlier results payload with every row's latency re-projected from its blocks
    (CHEETAH: refill sends read from each block's counters, protocols.refill; blocks that
    carry `refill_sends` keep them). Counters are unchanged; the static step's latency too."""
    import dataclasses

    from protocols.benchmark import Counters, _with_refills, total
    from protocols.registry import Protocol

    protocol = Protocol(**payload["protocol"])
    rows = []
    for row in payload["rows"]:
        blocks = {}
        for name, b in row["blocks"].items():
            c = Counters.from_json(b)
            if c.refill_sends is None:  # per layer, then times the layers that run it
                one = _with_refills(protocol, c.scale(1.0 / b["count"]), None)
                c = dataclasses.replace(c, refill_sends=None if one.refill_sends is None else
                                        tuple(r * b["count"] for r in one.refill_sends))
            blocks[name] = (b, c)
        world = len(row["bytes_per_party"])
        step = total(blocks, world)
        att = total({n: v for n, v in blocks.items() if n not in DENSE_BLOCKS}, world)
        new = dict(row)
        new["latency_s_before_refill_model"] = row["latency_s"]
        new["attention_latency_s_before_refill_model"] = row["attention_latency_s"]
        new["latency_s"] = latency(step, protocol, networks)
        new["attention_latency_s"] = latency(att, protocol, networks)
        new.update(refill_fields(step))
        new["attention_refill_sends"] = [round(r) for r in att.refills]
        new["blocks"] = {n: {**b, **c.to_json()} for n, (b, c) in blocks.items()}
        if "kept_rows_opening" not in row:   # (its per-block share is not stored: kept as is)
            sel = selecting_step(blocks, {n: b.get("every", 1) for n, (b, _) in blocks.items()},
                                 world, protocol, networks)
            new.pop("selecting_step", None)
            if sel:
                new["selecting_step"] = sel
        rows.append(new)
    add_reductions(rows)
    return {**payload, "rows": rows, "reprojected_from": payload.get("command"),
            "command": None, "run": None}   # measured nothing: the source's run is its own


def shortcuts(setting, hs, args):
    from protocols.benchmark import head_samples

    cfg = setting["cfg"]
    out = ["whole decode step = sum over block kinds of (one measured block x the layers that "
           "run it); selecting and index-sharing layers counted apart"]
    if hs != [cfg.n_kv_heads]:
        out.append(f"attention blocks measured on {hs} of {cfg.n_kv_heads} KV heads and "
                   "extrapolated linearly in heads (bytes, sends, seconds)")
    out.append("dense blocks (embedding, norms, projections, MLP, LM head, argmax) measured at "
               "the real dimensions, once for all policies and lengths")
    from protocols.blocks import head_slices
    slices = head_slices(cfg.vocab_size, cfg.d_model)
    if slices > 1:
        out.append(f"LM head measured as one of {slices} vocabulary slices, counted {slices} "
                   "times (simulator memory; a matmul's cost adds up over output columns)")
    out.append("latency_s is PROJECTED from measured counters (protocols.network), not timed on "
               "a network; compute_s is simulator wall-clock, all parties on this machine")
    out.append("oracle: attention over exactly the budget, selection free (the floor)")
    kept = sorted({(n, p.refresh) for n, p in setting["policies"].items()
                   if getattr(p, "refresh", 1) > 1})
    for n, r in kept:
        warm = getattr(setting["policies"][n], "warmup", 0)
        if warm:
            out.append(f"{n}: selects at every one of the {warm} decode steps from the last "
                       f"input token on, then every {r}: its rows are the STEADY step (after "
                       "the warm-up); the warm-up steps cost what its selecting step costs")
        out.append(f"{n}: selects every {r} decode steps and reuses the kept selection between; "
                   f"its select block is counted 1/{r} per step (AMORTISED: the mean step over "
                   f"{r} steps; a selecting step alone costs more, a reusing one less)"
                   + ("; kept='kv': the chosen clusters' K/V rows are gathered into a compact "
                      f"cache at each selection (compact block, also 1/{r}) and the steps "
                      "attend over it and the forced clusters"
                      if getattr(setting["policies"][n], "kept", "") == "kv" else ""))
    comp = sorted({(n, p.compaction) for n, p in setting["policies"].items()
                   if p is not None and hasattr(p, "compaction")})
    if comp:
        out.append("compaction kernels: " + ", ".join(f"{n} {c}" for n, c in comp))
    longest = max(setting["seqs"])
    static = sorted(n for n, p in setting["policies"].items()
                    if p is not None and (p.static_keep(longest) or longest) < longest)
    if static:
        pols = setting["policies"]
        out.append("static step: a ranking by attention reads the prefill's own "
                   "probabilities (a window sum is local additions), then top-k and "
                   "compaction by " + ", ".join(
                       f"{n} {'sort' if pols[n].static_sorts else 'onehot'}" for n in static))
    if setting["protocol"].beaver_cache:
        out.append("SEMI2K Beaver cache: weights and the KV rows written before the step are "
                   "opened once and kept (spu make_cached_var); blocks are measured steady, "
                   "on a second run with the same buffers, and the first run's extra bytes "
                   "are reported apart as one-time openings; a kept selection's compact rows "
                   "are opened anew after each refresh, twice (the selecting step, the next "
                   "one): counted 2/refresh per step (once in the selecting step), not as "
                   "one-time")
    if any(s > args.static_max_seq for s in setting["seqs"]):
        out.append(f"static step beyond {args.static_max_seq} tokens extrapolated from shorter "
                   "prompts (bytes, seconds: a*T + b*T^2 least squares; sends: the longest's; "
                   "a step ranked inside blocks, static_block: a line through two lengths "
                   "already cut into blocks, sends in proportion to T)")
    if any(n in setting["policies"] and setting["policies"][n] is not None and
           setting["policies"][n].static_keep(max(setting["seqs"])) is not None
           for n in setting["policies"]):
        shs = head_samples(cfg.n_kv_heads, setting["static_heads"])
        if shs != [cfg.n_kv_heads]:
            out.append(f"static step measured on {shs} of {cfg.n_kv_heads} KV heads, "
                       "extrapolated linearly in heads")
    if setting["protocol"].kind == "CHEETAH":
        out.append("CHEETAH: blocks under 10 s are the median of 3 runs; silent-OT refills "
                   "(~1-2 MB, ~2,200 sends each, about one per 40-100 MB of traffic) count "
                   "where a block's median run had one; its send counts (hence WAN "
                   "projections) are the least certain figures")
    out.append("random weights and inputs: SPU's costs do not depend on values (except "
               "data-dependent top-k in static steps, whose variation is within noise)")
    return out + setting["notes"]


def print_report(rows, setup, notes, networks):
    nets = [n for n in TABLE_NETWORKS if any(n == p.name for p in networks)] or \
        [networks[0].name]
    head = (f"{'policy':<18}{'seq':>6}{'GB all':>9}{'sends':>8}{'comp s':>8}"
            + "".join(f"{n + ' s*':>10}" for n in nets)
            + f"{'bytes x':>9}{'attn x':>8}" + "".join(f"{n + ' x':>8}" for n in nets))
    print(head)
    for r in rows:
        red = r["reduction_vs_full"]
        print(f"{r['policy']:<18}{r['seq']:>6}{r['bytes'] / 1e9:>9.3f}{r['sends']:>8.0f}"
              f"{r['compute_s']:>8.1f}"
              + "".join(f"{r['latency_s'][n]:>10.1f}" for n in nets)
              + f"{red['bytes']:>9.2f}{red['attention_bytes']:>8.2f}"
              + "".join(f"{red[n]:>8.2f}" for n in nets))
    print("\nbytes by category (MB, all parties):")
    cats = ("linear", "attention", "softmax", "selection", "gather", "other")
    print(f"{'policy':<18}{'seq':>6}" + "".join(f"{c:>11}" for c in cats))
    for r in rows:
        print(f"{r['policy']:<18}{r['seq']:>6}"
              + "".join(f"{r['bytes_by_category'].get(c, 0) / 1e6:>11.1f}" for c in cats))

    def step_lines(field, title):   # one line per row holding `field` (a step's figures)
        got = [r for r in rows if r.get(field)]
        if got:
            print(title)
        for r in got:
            s = r[field]
            tag = f"  [{s['extrapolated']}]" if s.get("extrapolated") else ""
            print(f"  {r['policy']:<16}{r['seq']:>6}  {s['bytes'] / 1e9:.3f} GB, "
                  f"{s['sends']:.0f} sends, {s['compute_s']:.1f} s compute, "
                  + ", ".join(f"{n} {s['latency_s'][n]:.1f} s*" for n in nets) + tag)

    step_lines("static_prefill",
               "\none-time static step at prefill (not in the decode step above):")
    step_lines("selecting_step",
               "\na step that selects afresh (kept selections; the rows above are the mean step):")
    opened = [r for r in rows if "one_time_openings" in r]
    if opened:
        print("\none-time openings under SEMI2K's Beaver cache (not in the steady step above):")
        for r in opened:
            o = r["one_time_openings"]
            print(f"  {r['policy']:<16}{r['seq']:>6}  weights {o['weights_bytes'] / 1e9:.3f} GB "
                  f"(once per session), KV rows {o['kv_rows_bytes'] / 1e9:.3f} GB (each row once)")
    if setup is not None:
        print(f"\none-time CHEETAH setup (HE keys, OT base; not in any figure above): "
              f"{setup.total_bytes / 1e6:.1f} MB, {max(setup.sends):.0f} sends")
    print("\n* projected; x = reduction vs full (higher is better). How these were made:")
    for n in notes:
        print(f"  - {n}")


CSV_FIELDS = ("policy", "protocol", "field", "seq", "budget", "attended", "retained", "bytes",
              "sends", "compute_s", "attention_bytes", "attention_sends")


def to_csv(rows) -> str:
    nets = list(rows[0]["latency_s"])
    cats = ("linear", "attention", "softmax", "selection", "gather", "other")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(CSV_FIELDS) + [f"latency_s_{n}" for n in nets]
               + ["reduction_bytes", "reduction_attention_bytes"]
               + [f"reduction_{n}" for n in nets] + [f"bytes_{c}" for c in cats]
               + ["static_bytes", "static_sends", "static_extrapolated",
                  "one_time_weights_bytes", "one_time_kv_rows_bytes"])
    for r in rows:
        st = r.get("static_prefill", {})
        w.writerow([r[f] for f in CSV_FIELDS] + [r["latency_s"][n] for n in nets]
                   + [r["reduction_vs_full"]["bytes"], r["reduction_vs_full"]["attention_bytes"]]
                   + [r["reduction_vs_full"][n] for n in nets]
                   + [r["bytes_by_category"].get(c, 0.0) for c in cats]
                   + [st.get("bytes", ""), st.get("sends", ""), st.get("extrapolated") or ""]
                   + [r.get("one_time_openings", {}).get(k, "")
                      for k in ("weights_bytes", "kv_rows_bytes")])
    return buf.getvalue()


def latency_figure(rows, nets):
    """Projected decode-step latency per policy: with several lengths, one panel per network
    (latency vs length); with one length, one panel of bars per network and policy (log
    scale: LAN and WAN differ by orders of magnitude)."""
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    seqs = sorted({r["seq"] for r in rows})
    if len(seqs) == 1:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(nets) * len(policies) + 2), 3.8))
        width = 0.8 / len(policies)
        for i, pol in enumerate(policies):
            r = next(r for r in rows if r["policy"] == pol)
            ax.bar([j + (i - (len(policies) - 1) / 2) * width for j in range(len(nets))],
                   [r["latency_s"][n] for n in nets], width, label=pol)
        ax.set_xticks(range(len(nets)), [f"{n}\n(projected)" for n in nets], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("decode step latency (s)")
        ax.set_title(f"one decode step, seq {seqs[0]}, {rows[0]['protocol']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig
    fig, axes = plt.subplots(1, len(nets), figsize=(4.2 * len(nets), 3.6), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for pol in policies:
            rs = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["seq"])
            ax.plot([r["seq"] for r in rs], [r["latency_s"][net] for r in rs], marker="o",
                    label=pol)
        ax.set_title(f"{net} (projected)")
        ax.set_xlabel("prompt tokens in cache")
        ax.set_ylabel("decode step latency (s)")
        ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(rows, out_dir, networks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = latency_figure(rows, [n.name for n in networks])
    fig.savefig(os.path.join(out_dir, "latency.png"), dpi=110)
    plt.close(fig)

    seq = max(r["seq"] for r in rows)
    rs = [r for r in rows if r["seq"] == seq]
    cats = ("linear", "attention", "softmax", "selection", "gather", "other")
    fig, ax = plt.subplots(figsize=(1.2 * len(rs) + 3, 3.8))
    bottom = [0.0] * len(rs)
    for c in cats:
        vals = [r["bytes_by_category"].get(c, 0.0) / 1e9 for r in rs]
        ax.bar([r["policy"] for r in rs], vals, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GB sent, all parties")
    ax.set_title(f"one decode step by category, seq {seq}, {rows[0]['protocol']}")
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bytes_by_category.png"), dpi=110)
    plt.close(fig)


def write_outputs(out_dir, payload, networks):
    """results.json, results.csv and the plots, all or none (experiments.cli)."""
    def fill(tmp):
        write_json_atomic(str(tmp / "results.json"), payload)
        (tmp / "results.csv").write_text(to_csv(payload["rows"]))
        plot(payload["rows"], str(tmp), networks)

    write_outputs_atomic(out_dir, fill)


def main(argv=None) -> None:
    import dataclasses

    from protocols.benchmark import BlockMeter

    args = parse_args(argv)
    if args.reproject:
        return main_reproject(args, argv)
    setting = build_setting(args)
    jobs, hs = plan(setting, args)
    start = time.perf_counter()
    if args.parties:
        from protocols.parties import load_parties
        from protocols.party import Cluster

        protocol = setting["protocol"]
        load_parties(args.parties).check_world(protocol.world_size, protocol.name)
        with Cluster(args.parties, args.model, start_local=not args.no_spawn,
                     log_dir=args.party_logs) as cluster:
            meter = BlockMeter(protocol, args.block_cache or None, cluster=cluster)
            measured = measure_all(meter, jobs)
            setup = meter.setup_cost()
    else:
        meter = BlockMeter(setting["protocol"], args.block_cache or None)
        measured = measure_all(meter, jobs)
        setup = meter.setup_cost()
    rows = make_rows(setting, measured, hs, args)
    notes = shortcuts(setting, hs, args)
    print_report(rows, setup, notes, setting["networks"])
    wall_s = time.perf_counter() - start
    print(f"\n{meter.misses} blocks measured, {meter.hits} from the block cache, "
          f"{wall_s:.0f} s")
    if args.out:
        cfg = setting["cfg"]
        payload = {
            "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
            "model": args.model, "config": dataclasses.asdict(cfg),
            "protocol": dataclasses.asdict(setting["protocol"]),
            "heads_measured": hs, "shortcuts": notes, "rows": rows,
            "backend": "brpc parties " + args.parties if args.parties else "simulator",
            "setup": None if setup is None else setup.to_json(),
            "networks": {n.name: {"bandwidth_bps": n.bandwidth_bps, "rtt_s": n.rtt_s,
                                  "source": n.source} for n in setting["networks"]},
            "cost_model": COST_MODEL,
            "run": {"wall_s": round(wall_s, 1), "blocks_measured": meter.misses,
                    "blocks_cached": meter.hits}}
        write_outputs(args.out, payload, setting["networks"])
        print(f"wrote {args.out}/results.json, results.csv, latency.png, bytes_by_category.png")


COST_MODEL = ("T = compute_s + k * max_i(sends_i - refill_sends_i) * RTT/2 + rho * "
              "max_i(refill_sends_i) * RTT/2 + max_i(bytes_i) / BW "
              "(protocols.network.projected_seconds; refill_sends: CHEETAH's silent-OT "
              "refill bursts, protocols.refill)")


def main_reproject(args, argv) -> None:
    """--reproject: today's cost model on an earlier run's counters (nothing measured)."""
    import json

    from protocols.network import (FLIGHTS_PER_SEND, REFILL_FLIGHTS_PER_SEND, NetworkProfile)

    if not args.out:
        raise ConfigError("--reproject needs --out")
    try:
        with open(args.reproject) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--reproject: cannot read {args.reproject}: {e}") from None
    networks = [NetworkProfile(n, v["bandwidth_bps"], v["rtt_s"], v["source"])
                for n, v in payload["networks"].items()]
    out = reproject(payload, networks)
    out["command"] = "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))
    out["cost_model"] = COST_MODEL
    out["flights_per_send"] = FLIGHTS_PER_SEND
    out["refill_flights_per_send"] = REFILL_FLIGHTS_PER_SEND
    print_reproject(out["rows"], payload["rows"])
    write_outputs(args.out, out, networks)
    print(f"wrote {args.out}/results.json, results.csv, latency.png, bytes_by_category.png")


def print_reproject(rows, before) -> None:
    print(f"{'policy':<12}{'seq':>6}{'sends':>9}{'refill':>9}{'refills':>8}"
          f"{'WAN s* before':>15}{'WAN s* now':>12}{'WAN x before':>13}{'WAN x now':>11}"
          f"{'attn LAN s* now':>16}")
    for r, b in zip(rows, before):
        print(f"{r['policy']:<12}{r['seq']:>6}{r['sends']:>9}{max(r['refill_sends']):>9}"
              f"{r['refills']:>8}{b['latency_s']['wan']:>15.0f}{r['latency_s']['wan']:>12.0f}"
              f"{b['reduction_vs_full']['wan']:>13.2f}{r['reduction_vs_full']['wan']:>11.2f}"
              f"{r['attention_latency_s']['lan']:>16.0f}")


if __name__ == "__main__":
    run_main(main)
