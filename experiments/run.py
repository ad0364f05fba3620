r"""Train and evaluate every method on the complex-IF data; write tables, plots and RESULTS.md.

    python -m experiments.run --quick --out runs/exp_quick                # tiny random model (~11 CPU-minutes)
    python -m experiments.run --budget cpu --out runs/exp_cpu             # SmolLM2-135M-Instruct, hours on CPU
    python -m experiments.run --budget gpu --out runs/exp_gpu --ifeval ../data/ifeval/input_data.jsonl

Steps (each resumable: rerunning the command with the same ``--out`` reuses finished pieces):

1. data: :func:`data_pipeline.complex_if.generate` with the budget's sizes into ``<out>/data`` (or
   ``--data_dir``);
2. model: quick = a tiny random Qwen2 made in ``<out>/tiny_model``; otherwise the budget's model fetched by
   :mod:`iopo_jax.tools.fetch_model` (or ``--model_dir``);
3. ``base`` is evaluated as it is; every other method (``experiments/configs/<method>.py``) is trained with
   :class:`iopo_jax.trainer.Trainer` (SFT/DPO/IOPO family) or :class:`iopo_jax.rl.loop.RLTrainer` (GRPO/SegPO)
   for each learning rate of the grid with the first seed, scored on the dev prompts (pass rate, then
   constraint accuracy), and the best learning rate is trained with every seed;
4. each trained adapter answers the test prompts (IF-S-like ``single``, IF-M-like ``multi`` and the held-out
   ``sectioned`` ones) greedily with our JAX sampler; the rule verifiers judge them
   (``evaluation.runner.evaluate``, the ``demo`` benchmark); with ``--ifeval`` also IFEval (out of domain);
5. ``<out>/results.json``, ``<out>/RESULTS.md`` and plots; ``--results`` copies the report elsewhere.

Metrics: IF = share of prompts whose constraints all pass (TRACE's IF metric) on single + multi; IF-S / IF-M;
constraint accuracy overall and per constraint type; on the sectioned prompts ILA, CLA, task-level pass rate
and the share with a correct section format; IFEval prompt- and instruction-level strict accuracy.
"""
from __future__ import annotations

import collections
import json
import math
import os
import shutil
import statistics
import sys
import time
import types
from typing import Optional, Sequence

from absl import flags

from data_pipeline import cli
from experiments.configs import METHODS, PREFERENCE_METHODS, RL_METHODS, get_method_config
from experiments.configs.common import BUDGETS, budget as make_budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ pieces
def ensure_data(b: dict, out: str, data_dir: str, progress: bool) -> str:
    if data_dir:
        return data_dir
    from data_pipeline import complex_if  # pylint: disable=import-outside-toplevel

    d = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(d, "stats.json")):
        data = complex_if.generate(b["seed"], b["groups"], ("en",), 9, b["eval_single"], b["eval_multi"], b["dev"],
                                   b["sectioned_train"], b["sectioned_eval"], progress=progress)
        complex_if.write(data, d)
    return d


def ensure_model(b: dict, out: str, model_dir: str, progress: bool) -> str:
    if model_dir:
        return os.path.expanduser(model_dir)
    if b["model"] == "tiny":
        from iopo_jax.tools.make_tiny_model import make_tiny_model  # pylint: disable=import-outside-toplevel

        d = os.path.join(out, "tiny_model")
        if not os.path.isfile(os.path.join(d, "config.json")):
            make_tiny_model(d)
        return d
    from iopo_jax.tools.fetch_model import fetch_model  # pylint: disable=import-outside-toplevel

    d = os.path.expanduser(os.path.join("~", ".cache", "iopo_jax", "models", b["model"]))
    return fetch_model(b["model"], d, quiet=not progress)


ADDED_FIELDS = {"rl_warm_start_steps": 0}  # budget fields added later, with the value earlier runs had


def check_budget(out: str, b: dict, data_dir: str, model_dir: str) -> None:
    """Resuming reuses finished runs, so an ``--out`` may only ever hold one budget, data and model."""
    path = os.path.join(out, "budget.json")
    want = json.loads(json.dumps({"budget": b, "data_dir": data_dir, "model_dir": model_dir}))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
        for k, v in ADDED_FIELDS.items():  # folders made before a field existed ran with its default
            have["budget"].setdefault(k, v)
        if have != want:
            diff = sorted(k for k in set(have["budget"]) | set(want["budget"])
                          if have["budget"].get(k) != want["budget"].get(k))
            diff += [k for k in ("data_dir", "model_dir") if have.get(k) != want.get(k)]
            raise SystemExit(f"{path}: this output folder was run with other settings ({', '.join(diff)}); "
                             "rerun with the same ones to resume, or pass a new --out")
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(want, f, indent=1)


def split_files(data_dir: str, out: str) -> dict:
    """``dev.jsonl`` / ``test.jsonl`` under ``<out>/prompts``: the single/multi prompts plus the sectioned ones
    (a third of the held-out sectioned prompts go to dev, the rest to test)."""
    def read(name):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            return [json.loads(x) for x in f if x.strip()]

    sec = read("sectioned_eval.jsonl")
    parts = {"dev": read("eval_dev.jsonl") + sec[::3],
             "test": read("eval_test.jsonl") + [r for i, r in enumerate(sec) if i % 3]}
    parts["test_sectioned"] = [r for r in parts["test"] if r["category"] == "sectioned"]
    os.makedirs(os.path.join(out, "prompts"), exist_ok=True)
    paths = {}
    for k, recs in parts.items():
        paths[k] = write_jsonl_if_changed(os.path.join(out, "prompts", f"{k}.jsonl"), recs)
    return paths


def write_jsonl_if_changed(path: str, records) -> str:
    """Write ``records`` as JSON lines (atomically), leaving the file alone when it already holds them (so a
    resumed run sees the same file). Returns ``path``."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


WARM = "sft_sectioned"  # the warm start of GRPO / SegPO (budget field rl_warm_start_steps), reported as a method


def warm_start(b: dict, model_dir: str, data_dir: str, out: str, progress: bool) -> tuple[str, str, float]:
    """SFT on the sectioned training prompts' reference answers, LoRA merged in (``<out>/sft_sectioned``):
    the model GRPO / SegPO start from and keep as their reference. Returns (merged model dir, workdir, wall s)."""
    from experiments.configs.common import warm_start_config  # pylint: disable=import-outside-toplevel

    wd = os.path.join(out, WARM, f"lr{b['lrs'][0]:g}_seed{b['seeds'][0]}")
    os.makedirs(wd, exist_ok=True)
    sft_file = os.path.join(wd, "sft_sectioned.jsonl")
    with open(os.path.join(data_dir, "sectioned_train.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(x) for x in f if x.strip()]
    missing = [r.get("id", i) for i, r in enumerate(recs) if not r.get("reference")]
    if missing:
        raise SystemExit(f"{data_dir}/sectioned_train.jsonl: {len(missing)} records have no 'reference' answer "
                         f"(first: {missing[0]}); the warm start (rl_warm_start_steps) trains on them")
    write_jsonl_if_changed(sft_file, ({"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["reference"]}]} for r in recs))
    cfg = warm_start_config(b, model_dir, sft_file, b["lrs"][0], b["seeds"][0])
    _, wall = train(WARM, cfg, wd, progress, f"{b['rl_warm_start_steps']} steps lr={b['lrs'][0]:g}")
    return os.path.join(wd, "export", "merged"), wd, wall


def train(method: str, cfg, workdir: str, progress: bool, label: str = "") -> tuple[str, float]:
    """Train one run (resumes; skipped when its exports exist); returns (adapter dir, wall seconds)."""
    adapter = os.path.join(workdir, "export", "adapter")
    timing = os.path.join(workdir, "train_wall_s.json")
    done = os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
    if cfg.export.merged:  # written after the adapter
        done = done and os.path.isfile(os.path.join(workdir, "export", "merged", "config.json"))
    if done:
        if not os.path.isfile(timing):
            return adapter, 0.0
        with open(timing, encoding="utf-8") as f:
            return adapter, float(json.load(f).get("wall_s", 0.0))
    print(f"[{method}] training {label} -> {workdir}", flush=True)
    t = time.time()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    if method in RL_METHODS:
        from iopo_jax.rl.loop import RLTrainer as Cls  # pylint: disable=import-outside-toplevel
    else:
        from iopo_jax.trainer import Trainer as Cls  # pylint: disable=import-outside-toplevel
    Cls(cfg, workdir, progress=progress).run()
    wall = time.time() - t
    with open(timing, "w") as f:
        json.dump({"wall_s": round(wall, 1), "note": "this invocation's part (a resumed training: the rest)"}, f)
    return adapter, wall


def evaluate(b: dict, model_dir: str, adapter: str, prompts: str, workdir: str, progress: bool) -> dict:
    """Greedy answers of base (+ adapter) to ``prompts``, judged by the verifiers; per-record judgments."""
    import ml_collections  # pylint: disable=import-outside-toplevel

    from evaluation import before_after  # pylint: disable=import-outside-toplevel

    job = ml_collections.ConfigDict({"eval_max_new_tokens": b["eval_max_new_tokens"],
                                     "eval_batch_size": b["eval_batch_size"]})
    t = time.time()
    cfg = before_after.eval_config(job, model_dir, adapter, workdir, prompts, progress)
    metrics, _ = before_after.evaluate_or_reuse(cfg)
    with open(os.path.join(workdir, "judgments.jsonl"), encoding="utf-8") as f:
        judgments = {j["id"]: j for j in map(json.loads, f) if j}
    with open(prompts, encoding="utf-8") as f:
        records = [json.loads(x) for x in f if x.strip()]
    wall = (metrics.get("run") or {}).get("wall time (s)") or round(time.time() - t, 1)  # the run's own time
    return {"demo_metrics": metrics, "scores": score(records, judgments), "wall_s": wall}


def finished_metrics(workdir: str) -> Optional[dict]:
    """The metrics of a finished evaluation in ``workdir`` (every item answered), else None."""
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    return m if m.get("n_missing_predictions") == 0 else None


def evaluate_ifeval(b: dict, model_dir: str, adapter: str, path: str, limit: int, workdir: str,
                    progress: bool) -> dict:
    from evaluation.config_defaults import base_config  # pylint: disable=import-outside-toplevel
    from evaluation.runner import evaluate as run_eval  # pylint: disable=import-outside-toplevel

    m = finished_metrics(workdir)
    if m is not None:
        return m
    c = base_config("ifeval")
    c.workdir, c.model_dir, c.lora, c.progress = workdir, model_dir, adapter, progress
    c.data.path, c.data.limit = path, limit
    c.generation.backend, c.generation.temperature = "jax", 0.0
    c.generation.max_new_tokens, c.generation.batch_size = b["eval_max_new_tokens"], b["eval_batch_size"]
    c.judge.base_url, c.judge.api_key_env, c.report.charts = "", "", False
    return run_eval(c)


def ifeval_or_reuse(b: dict, model_dir: str, adapter: str, args, workdir: str, progress: bool) -> Optional[dict]:
    """IFEval of one run: evaluated with ``--ifeval``; without it, a finished earlier IFEval evaluation of the
    run (an invocation with ``--ifeval`` on some of the methods) is reported as it is; otherwise None."""
    if args.ifeval:
        m = evaluate_ifeval(b, model_dir, adapter, args.ifeval, args.ifeval_limit, workdir, progress)
    else:
        m = finished_metrics(workdir)
    if m is not None:  # per prompt, for paired comparisons: [category, prompt strict, instruction verdicts strict]
        with open(os.path.join(workdir, "judgments.jsonl"), encoding="utf-8") as f:
            m = dict(m, per_prompt={j["id"]: ["ifeval", bool(j["prompt_strict"]), [bool(x) for x in j["strict"]]]
                                    for j in map(json.loads, f) if j.get("status") == "ok"})
    return m


def segment_example(b: dict, model_dir: str, data_dir: str, results: dict, prompts: str, out: str) -> dict:
    """SegPO's per-segment advantages on a held-out sectioned test prompt (the first, of at most 8 in file order,
    on which the segment term acts), rollouts sampled from the SegPO adapter of the first seed (see
    :mod:`experiments.segment_example`)."""
    from experiments import segment_example as E  # pylint: disable=import-outside-toplevel

    r = results["methods"]["segpo"]
    cfg = get_method_config("segpo", b, model_dir, data_dir, r["lr"], r["runs"][0]["seed"])
    return E.explain_cached(os.path.join(out, "segpo", "segment_example.json"), model_dir,
                            os.path.join(r["runs"][0]["workdir"], "export", "adapter"), E.sectioned_prompts(prompts),
                            group=b["rl_group"],
                            max_new_tokens=b["rl_response_tokens"], template=cfg.data.template,
                            system=cfg.data.system, temperature=cfg.rl.temperature, seed=0)


def _rate(xs) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def score(records: Sequence[dict], judgments: dict) -> dict:
    """The experiment's metrics from per-record judgments (each computed from the verifier verdicts)."""
    rows = [(r, judgments[r["id"]]) for r in records if r["id"] in judgments]
    flat = [(r, j) for r, j in rows if r["category"] in ("single", "multi")]
    sec = [(r, j) for r, j in rows if r["category"] == "sectioned"]
    by_type = collections.defaultdict(list)
    for _, j in flat:
        for t, c in zip(j["types"], j["checks"]):
            by_type[t].append(bool(c))
    return {
        "n": len(flat), "n_missing": len(records) - len(rows),
        "IF": _rate(j["all_pass"] for _, j in flat),
        "IF-S": _rate(j["all_pass"] for r, j in flat if r["category"] == "single"),
        "IF-M": _rate(j["all_pass"] for r, j in flat if r["category"] == "multi"),
        "constraint_accuracy": _rate(c for _, j in flat for c in j["checks"]),
        "per_type": {t: _rate(v) for t, v in sorted(by_type.items())},
        "sectioned": {"n": len(sec), "ILA": _rate(j["ila"] for _, j in sec), "CLA": _rate(j["cla"] for _, j in sec),
                      "task": _rate(j["all_pass"] for _, j in sec),
                      "format": _rate(bool(j["format_ok"]) for _, j in sec)},
        # per prompt, for paired comparisons between methods: [category, all pass, constraint verdicts]
        "per_prompt": {r["id"]: [r["category"], bool(j["all_pass"]), [bool(c) for c in j["checks"]]]
                       for r, j in rows},
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | no difference), ties dropped."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)


def paired(a: dict, b: dict, categories: Sequence[str]) -> dict:
    """Method a against method b on the same test prompts (first seed of each): prompts that pass for one and
    not the other, and the same per constraint, each with its sign-test p-value."""
    pa, pb = a["per_prompt"], b["per_prompt"]
    ids = [i for i in pa if i in pb and pa[i][0] in categories]
    pw = sum(pa[i][1] and not pb[i][1] for i in ids)
    pl = sum(pb[i][1] and not pa[i][1] for i in ids)
    cw = sum(x and not y for i in ids for x, y in zip(pa[i][2], pb[i][2]))
    cl = sum(y and not x for i in ids for x, y in zip(pa[i][2], pb[i][2]))
    return {"n": len(ids), "prompt_wins": pw, "prompt_losses": pl, "prompt_p": sign_test(pw, pl),
            "constraint_wins": cw, "constraint_losses": cl, "constraint_p": sign_test(cw, cl)}


PAIRS = (("iopo", "sft"), ("iopo", "dpo"), ("iopo", "iopo_star"), ("iopo", "iopo_no_input"),
         ("iopo", "iopo_no_output"), ("dpo", "sft"), ("segpo", "grpo"))


def paired_rows(results: dict) -> list[tuple[str, str, str, dict]]:
    """(a, b, prompt set, comparison) for every trained method against the base model and the pairs the papers
    compare, on the first seed; the preference methods on the single + multi prompts, GRPO / SegPO on the
    sectioned ones."""
    first = {m: r["runs"][0]["test"]["scores"] for m, r in results["methods"].items()}
    if not all("per_prompt" in s for s in first.values()):
        return []
    sets = {m: (("sectioned",), "sectioned") if m in RL_METHODS + (WARM,) else (("single", "multi"), "single + multi")
            for m in first}
    pairs = [(m, "base") for m in first if m != "base" and "base" in first]
    pairs += [(m, WARM) for m in RL_METHODS if m in first and WARM in first]  # RL against where it started
    pairs += [(a, b) for a, b in PAIRS if a in first and b in first]
    out = [(a, b, sets[a][1], paired(first[a], first[b], sets[a][0])) for a, b in pairs]
    ife = {m: r["runs"][0].get("ifeval") for m, r in results["methods"].items()}
    ife = {m: x for m, x in ife.items() if x and "per_prompt" in x}
    return out + [(a, b, "IFEval, strict", paired(ife[a], ife[b], ("ifeval",))) for a, b in pairs
                  if a in ife and b in ife]


def dev_key(s: dict) -> tuple:
    """Learning-rate selection: the dev pass rate (flat + sectioned prompts), then constraint accuracy."""
    flat_n, sec_n = s["n"], s["sectioned"]["n"]
    passed = (s["IF"] or 0) * flat_n + (s["sectioned"]["task"] or 0) * sec_n
    return (passed / max(1, flat_n + sec_n), s["constraint_accuracy"] or 0.0, s["sectioned"]["CLA"] or 0.0)


def mean_sd(xs: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ------------------------------------------------------------------------------------------ report
ROW_METRICS = (("IF", "IF (single+multi)"), ("IF-S", "IF-S-like"), ("IF-M", "IF-M-like"),
               ("constraint_accuracy", "constraint acc."))
SEC_METRICS = (("ILA", "ILA"), ("CLA", "CLA"), ("task", "task-level"), ("format", "format"))


def _fmt(m, s) -> str:
    if m is None:
        return "-"
    return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s else "")


def aggregate(results: dict) -> dict:
    """Per method: mean and sample standard deviation over seeds of every metric."""
    agg = {}
    for method, r in results["methods"].items():
        runs = [x["test"]["scores"] for x in r["runs"]]
        a = {k: mean_sd([s[k] for s in runs]) for k, _ in ROW_METRICS}
        a["sectioned"] = {k: mean_sd([s["sectioned"][k] for s in runs]) for k, _ in SEC_METRICS}
        types = sorted({t for s in runs for t in s["per_type"]})
        a["per_type"] = {t: mean_sd([s["per_type"].get(t) for s in runs]) for t in types}
        ife = [x.get("ifeval") for x in r["runs"] if x.get("ifeval")]
        if ife:
            a["ifeval"] = {k: mean_sd([m.get(k) for m in ife]) for k in ("prompt_level_strict", "inst_level_strict")}
        a["seeds"] = [x["seed"] for x in r["runs"]]
        agg[method] = a
    return agg


def markdown(results: dict, agg: dict, plots: dict) -> str:
    b = results["budget"]
    label = ("QUICK MODE (tiny random model, a pipeline check: these numbers say nothing about the methods)"
             if results["budget_name"] == "quick" else f"budget `{results['budget_name']}`")
    L = [f"# Experiments: {label}", "",
         f"Model: `{results['model_dir']}`; data: `{results['data_dir']}`; machine: {results['machine']}; "
         f"finished {results['finished']}; total wall time {results['wall_s']:.0f} s.", "",
         "Command:", "", "    " + results["command"], ""]
    ds = results.get("data_stats")
    if ds:
        a = ds.get("answers") or {}
        L += [f"Training data: {ds['iopo_groups']} IOPO groups (constraints per x1: {ds['x1_constraints']}); "
              f"templated answers {100 * (a.get('template_share') or 0):.0f}%, sampled y1 "
              f"{a.get('y1_sampled', 0)}, sampled y2 {a.get('y2_sampled', 0)} (`{results['data_dir']}/STATS.md`).", ""]
    L += [
         f"Budget: {b['steps']} steps of {b['batch_groups']} IOPO groups (SFT/DPO: the same groups as 2 records / "
         f"pairs each), LoRA r={b['lora_rank']}, learning-rate grid {list(b['lrs'])} searched with seed "
         f"{b['seeds'][0]} on the dev prompts, seeds {list(b['seeds'])}, greedy answers of at most "
         f"{b['eval_max_new_tokens']} new tokens. Cells: mean ± sample standard deviation over seeds, in %.", "",
    ]
    if WARM in results["methods"]:
        w = results["methods"][WARM]["runs"][0]
        L += [f"GRPO and SegPO start from `{WARM}`: the model after {b['rl_warm_start_steps']} SFT steps (lr "
              f"{results['methods'][WARM]['lr']}, seed {w['seed']}) on the sectioned training prompts' reference "
              f"answers, LoRA merged in (`{w['workdir']}/export/merged`); it is also their reference model, and its "
              "row is the RL runs' starting point.", ""]
    L += [
         "## Held-out pass rates", "",
         "| method | lr | " + " | ".join(n for _, n in ROW_METRICS) + " | " +
         " | ".join(f"sectioned {n}" for _, n in SEC_METRICS) + (" | IFEval prompt strict | IFEval inst. strict"
                                                                if any("ifeval" in a for a in agg.values()) else "")
         + " | n (flat/sectioned) | train s | eval s |",
         "|---|---|" + "---:|" * (len(ROW_METRICS) + len(SEC_METRICS)) +
         ("---:|---:|" if any("ifeval" in a for a in agg.values()) else "") + "---|---:|---:|"]
    for method, a in agg.items():
        r = results["methods"][method]
        cells = [_fmt(*a[k]) for k, _ in ROW_METRICS] + [_fmt(*a["sectioned"][k]) for k, _ in SEC_METRICS]
        if any("ifeval" in x for x in agg.values()):
            ie = a.get("ifeval", {})
            cells += [_fmt(*ie.get(k, (None, None))) for k in ("prompt_level_strict", "inst_level_strict")]
        s0 = r["runs"][0]["test"]["scores"]
        tr = sum(x.get("train_s", 0) for x in r["runs"]) + sum(x.get("train_s", 0) for x in r.get("lr_search", []))
        ev = sum(x["test"]["wall_s"] for x in r["runs"]) + sum(x.get("dev_eval_s", 0) for x in r.get("lr_search", []))
        L.append(f"| {method} | {r.get('lr', '-')} | " + " | ".join(cells) +
                 f" | {s0['n']}/{s0['sectioned']['n']} | {tr:.0f} | {ev:.0f} |")
    types = sorted({t for a in agg.values() for t in a["per_type"]})
    if types:
        L += ["", "## Accuracy per constraint type (single + multi prompts)", "",
              "| method | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for method, a in agg.items():
        if a["per_type"]:  # (none: judged on the sectioned prompts only)
            L.append(f"| {method} | " + " | ".join(_fmt(*a["per_type"].get(t, (None, None))) for t in types) + " |")
    L += ["", "## Learning-rate search (dev prompts, seed %s)" % b["seeds"][0], "",
          "| method | lr | dev pass rate | dev constraint acc. | train s |", "|---|---:|---:|---:|---:|"]
    if len(b["lrs"]) < 2:
        L.append("| (one learning rate in the grid: nothing searched, no dev evaluation) | | | | |")
    for method, r in results["methods"].items():
        for x in r.get("lr_search", []):
            L.append(f"| {method} | {x['lr']} | {_fmt(x['dev_key'][0], None)} | {_fmt(x['dev_key'][1], None)} | "
                     f"{x.get('train_s', 0):.0f} |")
    pr = paired_rows(results)
    if pr:
        L += ["", "## Paired comparisons (first seed, same test prompts)", "",
              "Prompts (all constraints pass) and single constraints (IFEval: instructions) that pass for one "
              "method and fail for the other; p: two-sided exact sign test over those discordant ones (ties dropped). With one seed this "
              "is the evidence the run gives on whether a difference is more than noise.", "",
              "| a | b | prompts | prompts a+ / b+ | p | constraints a+ / b+ | p |", "|---|---|---|---:|---:|---:|---:|"]
        for a, b, what, c in pr:
            L.append(f"| {a} | {b} | {what} ({c['n']}) | {c['prompt_wins']} / {c['prompt_losses']} | "
                     f"{c['prompt_p']:.3f} | {c['constraint_wins']} / {c['constraint_losses']} | {c['constraint_p']:.3f} |")
    ex = results.get("segment_example")
    if ex:
        from experiments.segment_example import markdown as ex_md  # pylint: disable=import-outside-toplevel

        L += ["", "## SegPO's advantages on one example", "",
              f"{len(ex['rollouts'])} rollouts of the held-out sectioned prompt `{ex['prompt_id']}` sampled from the "
              f"SegPO adapter (temperature {ex['temperature']}, seed {ex['seed']}); rewards from the verifiers. A "
              "token of segment j of rollout i is trained with A = A_o(i) + A_phi(i, j); GRPO gives every token "
              "A_o(i). The texts are in `segpo/segment_example.json`." + passed_over_note(ex), "", ex_md(ex)]
    L += ["", "## Plots", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in plots.items()] + [""]
    return "\n".join(L)


def passed_over_note(ex: dict) -> str:
    """What the example's choice of prompt was (examples made before the choice existed say nothing)."""
    from experiments.segment_example import segment_term_acts  # pylint: disable=import-outside-toplevel

    if "passed_over" not in ex:
        return ""
    before = ex["passed_over"]
    if segment_term_acts(ex):
        return (f" It is the first held-out sectioned test prompt whose rollouts make the segment term act; on the "
                f"{len(before)} before it ({', '.join(before) or 'none'}) every A_phi was 0." if before else
                " Its rollouts make the segment term act (the first sectioned test prompt tried).")
    return (f" On none of the {len(before) + 1} held-out sectioned prompts tried (this one, "
            f"{', '.join(before) or 'no other'}) did a section pass in some rollouts and fail in others, so every "
            "A_phi is 0 and SegPO's update equals GRPO's.")


def plot(agg: dict, path: str) -> str:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    methods = list(agg)
    keys = [("IF", "IF"), ("IF-S", "IF-S"), ("IF-M", "IF-M"), ("constraint_accuracy", "constraint acc.")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    x = np.arange(len(methods))
    w = 0.8 / len(keys)
    flat = [mm for mm in methods if agg[mm]["IF"][0] is not None]  # (--rl_test=sectioned: RL methods have none)
    x0 = np.arange(len(flat))
    for i, (k, name) in enumerate(keys):
        m = [100 * (agg[mm][k][0] or 0) for mm in flat]
        s = [100 * (agg[mm][k][1] or 0) for mm in flat]
        axes[0].bar(x0 + i * w - 0.4 + w / 2, m, w, yerr=s, label=name, capsize=2)
    axes[0].set_xticks(x0, flat, rotation=30, fontsize=8)
    axes[0].set_ylabel("% (held-out)")
    axes[0].set_title("single + multi prompts")
    axes[0].legend(fontsize=7)
    for i, (k, name) in enumerate(SEC_METRICS):
        m = [100 * (agg[mm]["sectioned"][k][0] or 0) for mm in methods]
        s = [100 * (agg[mm]["sectioned"][k][1] or 0) for mm in methods]
        axes[1].bar(x + i * w - 0.4 + w / 2, m, w, yerr=s, label=name, capsize=2)
    axes[1].set_xticks(x, methods, rotation=30, fontsize=8)
    axes[1].set_title("sectioned prompts (EIFBench-like)")
    axes[1].legend(fontsize=7)
    for a in axes:
        a.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver
def run(args) -> dict:
    t0 = time.time()
    overrides = {}
    if args.lrs:
        overrides["lrs"] = tuple(args.lrs)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.steps:
        overrides["steps"] = args.steps
    for item in args.set:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            overrides[key.strip()] = val
    try:
        b = make_budget("quick" if args.quick else args.budget, **overrides)
    except ValueError as e:
        raise SystemExit(f"--set/--lrs/--seeds/--steps: {e}") from e
    if isinstance(b["lrs"], list) or isinstance(b["seeds"], list):
        b["lrs"], b["seeds"] = tuple(b["lrs"]), tuple(b["seeds"])
    methods = list(args.methods) or list(METHODS)
    progress = args.progress
    from iopo_jax.compile_cache import enable_compilation_cache  # pylint: disable=import-outside-toplevel

    enable_compilation_cache("auto")  # the many evaluations and trainings share compiled programs
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    check_budget(out, b, args.data_dir, args.model_dir)
    print(f"[data] {out}", flush=True)
    data_dir = ensure_data(b, out, args.data_dir, progress)
    model_dir = ensure_model(b, out, args.model_dir, progress)
    prompts = split_files(data_dir, out)
    results = {"budget_name": "quick" if args.quick else args.budget, "budget": b, "model_dir": model_dir,
               "data_dir": data_dir, "command": "python -m experiments.run " + " ".join(args.argv), "methods": {}}
    rl_model_dir = model_dir  # GRPO / SegPO's model: the warm start when the budget asks for one
    if b["rl_warm_start_steps"] and any(m in RL_METHODS for m in methods):
        mt = time.time()
        rl_model_dir, wd, tr_s = warm_start(b, model_dir, data_dir, out, progress)
        ev = evaluate(b, rl_model_dir, "", prompts["test_sectioned"], os.path.join(wd, "eval_test_sectioned"), progress)
        results["methods"][WARM] = {"runs": [{"seed": b["seeds"][0], "workdir": wd, "train_s": round(tr_s, 1),
                                              "test": ev}], "lr": b["lrs"][0]}
        print(f"[{WARM}] GRPO / SegPO start from {rl_model_dir}: sectioned task-level "
              f"{ev['scores']['sectioned']['task']} ({time.time() - mt:.0f} s)", flush=True)
    for method in methods:
        mt = time.time()
        if method == "base":
            ev = evaluate(b, model_dir, "", prompts["test"], os.path.join(out, "base", "eval_test"), progress)
            run_rec = {"seed": None, "test": ev}
            ife = ifeval_or_reuse(b, model_dir, "", args, os.path.join(out, "base", "ifeval"), progress)
            if ife:
                run_rec["ifeval"] = ife
            results["methods"][method] = {"runs": [run_rec], "lr": "-"}
            print(f"[{method}] test IF {ev['scores']['IF']} ({time.time() - mt:.0f} s)", flush=True)
            continue
        search = []
        seed0 = b["seeds"][0]
        mdir = rl_model_dir if method in RL_METHODS else model_dir
        for lr in b["lrs"]:
            wd = os.path.join(out, method, f"lr{lr:g}_seed{seed0}")
            cfg = get_method_config(method, b, mdir, data_dir, lr, seed0)
            adapter, tr_s = train(method, cfg, wd, progress, f"lr={lr:g} seed={seed0}")
            rec = {"lr": lr, "workdir": wd, "adapter": adapter, "train_s": round(tr_s, 1)}
            if len(b["lrs"]) > 1:
                dev = evaluate(b, mdir, adapter, prompts["dev"], os.path.join(wd, "eval_dev"), progress)
                rec.update(dev_key=list(dev_key(dev["scores"])), dev_eval_s=dev["wall_s"])
            else:
                rec["dev_key"] = [None, None, None]
            search.append(rec)
        best = max(search, key=lambda r: tuple(x or 0 for x in r["dev_key"])) if len(search) > 1 else search[0]
        runs = []
        for seed in b["seeds"]:
            if seed == seed0:
                adapter, wd, tr_s = best["adapter"], best["workdir"], best["train_s"]
            else:
                wd = os.path.join(out, method, f"lr{best['lr']:g}_seed{seed}")
                adapter, tr_s = train(method, get_method_config(method, b, mdir, data_dir, best["lr"], seed),
                                      wd, progress, f"lr={best['lr']:g} seed={seed}")
            if method in RL_METHODS and args.rl_test == "sectioned":  # only the prompts RL trains for
                ev = evaluate(b, mdir, adapter, prompts["test_sectioned"], os.path.join(wd, "eval_test_sectioned"),
                              progress)
            else:
                ev = evaluate(b, mdir, adapter, prompts["test"], os.path.join(wd, "eval_test"), progress)
            run_rec = {"seed": seed, "workdir": wd, "train_s": round(tr_s, 1) if seed != seed0 else 0.0, "test": ev}
            # (the first seed's training time is counted once, under lr_search)
            ife = ifeval_or_reuse(b, mdir, adapter, args, os.path.join(wd, "ifeval"), progress)
            if ife:
                run_rec["ifeval"] = ife
            runs.append(run_rec)
        results["methods"][method] = {"runs": runs, "lr": best["lr"], "lr_search": search}
        print(f"[{method}] lr={best['lr']:g} test IF per seed {[r['test']['scores']['IF'] for r in runs]} "
              f"({time.time() - mt:.0f} s)", flush=True)
    if "segpo" in results["methods"]:
        results["segment_example"] = segment_example(b, rl_model_dir, data_dir, results, prompts["test"], out)
    stats_path = os.path.join(data_dir, "stats.json")
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            st = json.load(f)
        results["data_stats"] = {"iopo_groups": st.get("iopo_groups"), "answers": st.get("answers"),
                                 "x1_constraints": st.get("x1_constraints")}
    results["wall_s"] = round(time.time() - t0, 1)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["machine"] = args.machine or f"{os.cpu_count()} CPUs"
    agg = aggregate(results)
    results["aggregate"] = agg
    plots = {"pass rates by method": plot(agg, os.path.join(out, "results.png"))}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    md = markdown(results, agg, plots)
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(md)
    if args.results:
        dst = os.path.abspath(args.results)
        png = os.path.join(os.path.dirname(dst), os.path.splitext(os.path.basename(dst))[0].lower() + ".png")
        shutil.copyfile(plots["pass rates by method"], png)
        with open(dst, "w", encoding="utf-8") as f:
            f.write(md.replace("](results.png)", f"]({os.path.basename(png)})"))
    print(md, flush=True)
    return results


PROG = "python -m experiments.run"


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", None, "output folder (data, runs, evaluations, results); rerun to resume", flag_values=fv)
    f.DEFINE_bool("quick", False, "the quick budget: tiny random model, a pipeline check (~11 CPU-minutes)",
                  flag_values=fv)
    f.DEFINE_enum("budget", "cpu", sorted(BUDGETS), "budget of experiments/configs/common.py when --quick is not given",
                  flag_values=fv)
    cli.define_list("methods", [], f"comma list (default all: {','.join(METHODS)})", fv, choices=METHODS)
    cli.define_list("lrs", [], "comma list overriding the budget's learning-rate grid", fv, float)
    cli.define_list("seeds", [], "comma list overriding the budget's seeds", fv, int)
    f.DEFINE_integer("steps", 0, "override the budget's optimizer steps (0 = budget)", flag_values=fv)
    f.DEFINE_multi_string("set", [], "FIELD=VALUE: override any budget field (repeatable; VALUE is JSON or a string), "
                          "e.g. --set eval_multi=20 --set rl_response_tokens=64; fields: experiments/configs/common.py",
                          flag_values=fv)
    f.DEFINE_string("model_dir", "", "model directory ('' = the budget's model, fetched or made)", flag_values=fv)
    f.DEFINE_string("data_dir", "", "complex_if output to use ('' = generate into <out>/data)", flag_values=fv)
    f.DEFINE_enum("rl_test", "all", ["all", "sectioned"], "test prompts of GRPO / SegPO: all, or only the held-out "
                  "sectioned ones they are trained for (a fifth of the evaluation time; their single/multi "
                  "columns then read '-')", flag_values=fv)
    f.DEFINE_string("ifeval", "", "IFEval input_data.jsonl: also evaluate out of domain ('' = skip)", flag_values=fv)
    f.DEFINE_integer("ifeval_limit", 0, "first N IFEval prompts (0 = all)", flag_values=fv)
    f.DEFINE_string("results", "", "also write the report here (e.g. experiments/RESULTS.md) with its plot next to it",
                    flag_values=fv)
    f.DEFINE_string("machine", "", "machine description written into the report", flag_values=fv)
    f.DEFINE_bool("progress", True, "progress bars on stderr (--noprogress: none)", flag_values=fv)
    f.mark_flag_as_required("out", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fv, positional = cli.parse(PROG, __doc__, define_flags, argv)
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    run(types.SimpleNamespace(**fv.flag_values_dict(), argv=argv))
    return 0


if __name__ == "__main__":
    cli.run(main)
