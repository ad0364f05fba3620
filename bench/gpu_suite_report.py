"""Collect the per-benchmark JSON files of bench/gpu_suite.sh into ``suite.json`` and a ``suite.md`` table.

    python bench/gpu_suite_report.py OUT_DIR [--tiny 0|1] [--peak_tflops 989] [--peak_bandwidth_gbs 4800]

Targets (issue 15): IOPO step MFU >= 40% and >= 2x the tokens/s of transformers + peft; decode >= 60% of
the HBM roofline. A benchmark that failed or is missing shows up as such (its log is in OUT_DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from peak import git_commit  # bench/peak.py


def _load(out, name):
    p = os.path.join(out, name + ".json")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def _status(out):
    st = {}
    p = os.path.join(out, "status.txt")
    if os.path.isfile(p):
        for line in open(p):
            if " rc=" in line:
                name, rest = line.split(" ", 1)
                st[name] = dict(kv.split("=") for kv in rest.split())
    return st


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.0f}"):
    return "n/a" if x is None else fmt.format(x)


def rows_of(out):
    """(benchmark, measured, target / ratio) rows and the raw data."""
    rows, raw = [], {}
    d = _load(out, "deps")
    raw["deps"] = d
    if d:
        miss = d.get("missing_required") or []
        bad = [i["module"] for i in d.get("imports", []) if not i.get("ok")]
        what = ("all found" if not miss else "MISSING " + " ".join(miss)) + (
            "; entry imports OK" if not bad else "; import FAILED: " + " ".join(bad))
        if d.get("expect_platform"):
            what += f"; jax devices: {d.get('devices')}"
        rows.append((f"dependencies (Python {d.get('python')})", what,
                     "OK" if d.get("ok") else "FAILED (see deps.txt: carry wheels with --wheels DIR)"))
    for name in ("train", "train_share", "train_long"):
        d = _load(out, name)
        raw[name] = d
        if not d:
            rows.append((name, "no result (see the log)", ""))
            continue
        for r in d["results"]:
            s, o = r["setting"], r["ours"]
            what = (f"prompts ~{s['prompt']}, answers ~{s['response']}, {s['groups']} group(s), length {s['length']}"
                    + (" (shared prompts)" if s.get("share_prompt") else ""))
            side = lambda x: (f"FAILED ({x['error'][:200]})" if "error" in x else
                              f"{x['median_s']:.3f} s/step, {x['tokens_per_s']:.0f} tok/s, MFU {_pct(x.get('mfu'))}")
            line = "ours " + side(o)
            target = "MFU >= 40%"
            if "torch" in r:
                t = r["torch"]
                line += "; transformers+peft " + side(t)
                if "error" not in o and "error" not in t:
                    target = f"tokens/s ours / torch = {o['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 2x)"
            if s.get("share_prompt"):
                target += (f"; padded tokens {s['shared_prompt_padded_tokens']} vs {s['padded_tokens']} unpacked "
                           f"({100 * (1 - s['shared_prompt_padded_tokens'] / s['padded_tokens']):.0f}% fewer)")
            rows.append((f"{name}: {what}", line, target))
    d = _load(out, "sampler")
    raw["sampler"] = d
    if d:
        for b, o in d["ours"].items():
            rf = (d.get("roofline") or {}).get(str(b)) or (d.get("roofline") or {}).get(b)
            rows.append((f"sampler batch {b}, prompt {d['config']['prompt_len']}, {d['config']['new_tokens']} new",
                         f"decode {o['decode_tok_s']:.0f} tok/s ({o['decode_step_ms']:.2f} ms/step), prefill "
                         f"{o['prefill_tok_s']:.0f} tok/s",
                         f"HBM roofline {_pct(rf['roofline_fraction'] if rf else None)} (target >= 60%)"))
    else:
        rows.append(("sampler", "no result (see the log)", ""))
    d = _load(out, "rl")
    raw["rl"] = d
    if d:
        rows.append((f"RL iteration ({d['objective']}, {d['rows']} rollouts)",
                     f"{d['iteration_s']:.2f} s: rollout {d['rollout_s']:.2f}, reward {d['reward_s']:.2f}, "
                     f"reference {d['reference_s']:.2f}, learner {d['learner_s']:.2f}",
                     f"rollout / sampler alone time per token = {d['rollout_vs_sampler']:.2f}"))
    else:
        rows.append(("rl", "no result (see the log)", ""))
    d = _load(out, "load")
    raw["load"] = d
    if d:
        for t in d.get("table", []):
            rows.append((f"load: {t.get('variant', t.get('name', ''))}",
                         ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("variant", "name")), ""))
    else:
        rows.append(("load", "no result (see the log)", ""))
    return rows, raw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the suite's output directory")
    p.add_argument("--tiny", type=int, default=0, help="1 if the suite ran with --tiny shapes")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="peak used for MFU")
    p.add_argument("--peak_bandwidth_gbs", type=float, default=4800.0, help="peak used for the roofline")
    a = p.parse_args(argv)
    rows, raw = rows_of(a.out)
    commit = git_commit()
    device = "unknown"
    deps = raw.get("deps") or {}
    if deps.get("platform_ok") and deps.get("devices"):
        device = deps["devices"]
    for d in raw.values():
        if isinstance(d, dict):
            dev = (d.get("config") or {}).get("device") if isinstance(d.get("config"), dict) else None
            if dev:
                device = dev
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "host": platform.node(),
            "device": device, "tiny": bool(a.tiny), "peak_tflops": a.peak_tflops,
            "peak_bandwidth_gbs": a.peak_bandwidth_gbs, "status": _status(a.out)}
    with open(os.path.join(a.out, "suite.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": raw}, f, indent=2, default=str)
    md = [f"# GPU suite ({'tiny dry run' if a.tiny else 'full'}) - {meta['date']}, commit {commit}, device {device}",
          "", f"peak {a.peak_tflops:g} TFLOP/s (MFU), {a.peak_bandwidth_gbs:g} GB/s (roofline)", "",
          "| benchmark | measured | target / ratio |", "|---|---|---|"]
    md += [f"| {b} | {m} | {t} |" for b, m, t in rows]
    md += ["", "status: " + "; ".join(f"{k} rc={v.get('rc')}" + (f" ({v['seconds']} s)" if "seconds" in v else "")
                                     for k, v in meta["status"].items())]
    with open(os.path.join(a.out, "suite.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
