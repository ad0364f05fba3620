"""Batch generation over a JSONL file with the JAX sampler: resumable, chat-formatted, with a progress bar.

Input: one JSON object per line, ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [{"role",
"content"}, ...]}``. Prompts are wrapped as one user message and formatted with the model's chat
template (``--nochat_template`` sends them as raw text). Output: one line per input id,
``{"id", "response", "finish_reason", "num_prompt_tokens", "num_tokens"}`` (with ``--n > 1``:
``responses`` / ``finish_reasons`` lists), plus ``token_ids`` / ``logprobs`` when asked. The output is
appended and flushed as records finish (with continuous batching, the default, every record as soon as
its samples are done; with ``--batching=static`` after every batch), in completion order; rerunning the
same command skips the ids already there, so a crash loses only the records in flight. Samples are
seeded per record (``--seed`` and the id), so a resumed run draws what an uninterrupted one would have.

Example::

    python -m iopo_jax.tools.make_tiny_model --out /tmp/tiny
    printf '{"id": 1, "prompt": "Hello"}\\n' > /tmp/prompts.jsonl
    python -m iopo_jax.sampling.generate --model_dir=/tmp/tiny --input=/tmp/prompts.jsonl --output=/tmp/out.jsonl \\
        --max_new_tokens=32 --temperature=0.7 --top_p=0.9
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
from absl import flags

from data_pipeline import cli
from data_pipeline.hashing import seed63
from data_pipeline.schema import field_defaults, from_mapping, parse_list
from iopo_jax.compile_cache import enable_compilation_cache
from iopo_jax.multihost import require_single_process
from iopo_jax.sampling import GenerationStats, Row, Sampler, SamplingParams
from iopo_jax.sharding import make_mesh

LANE_PROMOTION_HELP = ("continuous batching: a row starts in the shortest KV-cache lane that holds its prompt and "
                       "next decode chunk and moves to a longer one as it grows (less attention work per step); "
                       "same outputs either way")
SCAN_LAYERS_HELP = ("the decoder layers as one lax.scan over stacked weights (true: one compiled layer body) or "
                    "unrolled (false: longer compilation, faster decode steps on CPU, where XLA copies each layer's "
                    "weight slice in a loop); auto: false on CPU, true on accelerators; same outputs")

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A problem with the input or output file, naming file, line and field."""


@dataclasses.dataclass
class GenerateArgs:
    """Everything ``python -m iopo_jax.sampling.generate`` needs (the flags, as a dataclass for Python callers)."""

    model_dir: str
    input: str
    output: str
    lora: Optional[str] = None
    tokenizer_dir: Optional[str] = None
    batch_size: int = 32
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    n: int = 1
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: bool = False
    save_token_ids: bool = False
    chat_template: bool = True
    system: Optional[str] = None
    dtype: str = "float32"
    mesh: str = ""
    max_model_len: int = 0
    progress: bool = True
    batching: str = "continuous"  # or "static": the batch-level engine (a batch runs until its longest answer)
    prefill_budget: int = 512  # continuous: padded prompt tokens prefilled per scheduler round (>= one chunk)
    lane_promotion: bool = True  # continuous: rows move to longer KV-cache lanes as they grow (same outputs)
    scan_layers: str = "auto"  # layer loop: "true" (lax.scan), "false" (unrolled), "auto" (unrolled on CPU)


def parse_mesh(spec: str):
    """``"fsdp=-1,tensor=2"`` -> a mesh; ``""`` -> None on one device, else fsdp over all devices."""
    spec = (spec or "").strip()
    if not spec:
        return None if jax.device_count() == 1 else make_mesh({"fsdp": -1})
    shape = {}
    for part in spec.split(","):
        name, sep, val = part.partition("=")
        try:
            shape[name.strip()] = int(val)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--mesh: expected 'axis=size,...' (axes data, fsdp, tensor; one size may be -1), "
                             f"got {spec!r}")
    return make_mesh(shape)


def record_seed(seed: int, rid: str) -> int:
    """A 63-bit seed from the run seed and a record id (stable across runs and orderings)."""
    return seed63(f"{seed}\x00{rid}")


def read_input(path: str) -> list[dict]:
    """Validated input records ``{"id": str, "prompt"|"messages", "line"}``; errors name file:line and field."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: input file not found")
    out, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if "id" not in rec or not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
                raise InputError(f"{path}:{lineno}: field 'id' is missing or not a string/integer")
            rid = str(rec["id"])
            if rid in seen:
                raise InputError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen[rid] = lineno
            has_p, has_m = "prompt" in rec, "messages" in rec
            if has_p == has_m:
                raise InputError(f"{path}:{lineno}: give exactly one of the fields 'prompt' and 'messages'")
            if has_p and not isinstance(rec["prompt"], str):
                raise InputError(f"{path}:{lineno}: field 'prompt' must be a string")
            if has_m:
                msgs = rec["messages"]
                if not isinstance(msgs, list) or not msgs:
                    raise InputError(f"{path}:{lineno}: field 'messages' must be a non-empty list")
                for j, m in enumerate(msgs):
                    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                            m.get("content"), str):
                        raise InputError(f"{path}:{lineno}: field 'messages[{j}]' needs string 'role' and 'content'")
            out.append({"id": rid, "line": lineno, **({"prompt": rec["prompt"]} if has_p else
                                                      {"messages": rec["messages"]})})
    return out


def read_done_ids(path: str) -> set[str]:
    """Ids already in the output file.

    A torn last line (a crash in the middle of a write) is cut off with a warning; any other line that
    is not a JSON object with an ``id`` raises, naming the line.
    """
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        head, _, tail = data.rpartition(b"\n")
        head = head + b"\n" if head else b""
        try:
            str(json.loads(tail)["id"])
            with open(path, "ab") as f:  # a complete record, only its newline is missing
                f.write(b"\n")
            data += b"\n"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(tail))
            with open(path, "r+b") as f:
                f.truncate(len(head))
            data = head
    for lineno, raw in enumerate(data.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            done.add(str(json.loads(raw)["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{lineno}: not a valid output record ({type(e).__name__}: {e}); "
                             "fix or remove the line") from None
    return done


def _conversation(rec: dict, args: GenerateArgs):
    if "messages" in rec:
        return rec["messages"]
    if not args.chat_template:
        return rec["prompt"]
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": rec["prompt"]}]


def run(args: GenerateArgs, sampler=None) -> dict[str, Any]:
    """Generate for every input id not yet in the output. Returns a summary dict."""
    records = read_input(args.input)
    done = read_done_ids(args.output)
    pending = [r for r in records if r["id"] not in done]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, n=args.n, stop=tuple(args.stop),
                            stop_token_ids=tuple(int(t) for t in args.stop_token_ids), logprobs=args.logprobs)
    summary = dict(total=len(records), skipped=len(records) - len(pending), generated=0, tokens=0, seconds=0.0)
    if not pending:
        logger.info("all %d ids of %s are already in %s", len(records), args.input, args.output)
        return summary
    if sampler is None:
        rows = max(args.batch_size, args.n)
        kw = {}
        if args.batching != "continuous":
            # Two batch buckets (full, quarter): a file compiles once per prompt bucket, plus once for a short tail.
            kw["batch_buckets"] = sorted({max(1, rows // 4), rows})
        sampler = Sampler.from_pretrained(args.model_dir, lora=args.lora, mesh=parse_mesh(args.mesh),
                                          dtype=args.dtype, param_dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
                                          max_batch_size=rows, max_model_len=args.max_model_len or None,
                                          continuous=args.batching == "continuous",
                                          prefill_budget=args.prefill_budget, lane_promotion=args.lane_promotion,
                                          scan_layers=args.scan_layers, **kw)
    # Tokenize and check everything first: a bad record fails the run before any compute.
    for r in pending:
        where = f"{args.input}:{r['line']}"
        try:
            r["ids"] = sampler.encode(_conversation(r, args), where=where)
            sampler.check_length(len(r["ids"]), params.max_new_tokens, where=where)
        except ValueError as e:
            raise InputError(f"{e} (raise --max_model_len or lower --max_new_tokens)"
                             if "context" in str(e) or "bucket" in str(e) else str(e)) from None
    pending.sort(key=lambda r: len(r["ids"]))
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="prompt", desc="generate", dynamic_ncols=True)
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as out:
        def write(done_records):
            for r, cs in done_records:
                out.write(json.dumps(_output_record(r, cs, args), ensure_ascii=False) + "\n")
                summary["tokens"] += sum(c.num_tokens for c in cs)
            out.flush()
            os.fsync(out.fileno())
            summary["generated"] += len(done_records)
            if bar is not None:
                el = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{summary['tokens'] / max(el, 1e-9):.1f}")
                bar.update(len(done_records))

        if getattr(sampler, "continuous", False):
            _stream_continuous(sampler, pending, params, args, write)
        else:
            per_batch = max(1, args.batch_size // args.n)
            for s in range(0, len(pending), per_batch):
                group = pending[s:s + per_batch]
                comps = sampler.generate([r["ids"] for r in group], params,
                                         seeds=[record_seed(args.seed, r["id"]) for r in group])
                write([(r, comps[k * args.n:(k + 1) * args.n]) for k, r in enumerate(group)])
    if bar is not None:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    summary["stats"] = sampler.total_stats.as_dict()
    return summary


def _stream_continuous(sampler, pending: list[dict], params, args: GenerateArgs, write):
    """Continuous batching over the whole file: rows are fed to the scheduler a window at a time (longest
    prompts first, so that their chunked prefill overlaps the decoding of the short ones) and every record
    is written as soon as its ``n`` samples are done, not at the end of a batch."""
    sch = sampler.scheduler
    before = dataclasses.replace(sch.stats)
    todo = sorted(pending, key=lambda r: -len(r["ids"]))
    todo.reverse()  # pop() from the end: longest first
    window = 2 * max(args.batch_size, args.n)
    live: list[tuple[dict, list]] = []
    all_rows = []
    while todo or live:
        while todo and len(sch.waiting) < window:
            r = todo.pop()
            seed = record_seed(args.seed, r["id"])
            rows = [Row(r["ids"], params, seed, prompt_index=0, sample_index=j, key_index=0) for j in range(args.n)]
            sampler.submit(rows)
            live.append((r, rows))
            all_rows += rows
        sampler.step()
        done = [(r, rows) for r, rows in live if all(x.finished for x in rows)]
        if done:
            live = [(r, rows) for r, rows in live if not all(x.finished for x in rows)]
            write([(r, [x.completion() for x in rows]) for r, rows in done])
    stats = GenerationStats(num_sequences=len(all_rows), prompt_tokens=sum(len(r.prompt_ids) for r in all_rows),
                            generated_tokens=sum(len(r.token_ids) for r in all_rows),
                            prefill_s=sch.stats.prefill_s - before.prefill_s,
                            decode_s=sch.stats.decode_s - before.decode_s, batches=sch.stats.batches - before.batches)
    sampler.last_stats = stats
    sampler.total_stats.add(stats)


def _output_record(rec: dict, comps, args: GenerateArgs) -> dict:
    c0 = comps[0]
    out: dict[str, Any] = {"id": rec["id"]}
    if args.n == 1:
        out.update(response=c0.text, finish_reason=c0.finish_reason)
    else:
        out.update(responses=[c.text for c in comps], finish_reasons=[c.finish_reason for c in comps])
    out.update(num_prompt_tokens=c0.num_prompt_tokens, num_tokens=sum(c.num_tokens for c in comps))
    if args.save_token_ids:
        ids = [c.token_ids for c in comps]
        out["token_ids"] = ids[0] if args.n == 1 else ids
    if args.logprobs:
        lps = [c.logprobs for c in comps]
        out["logprobs"] = lps[0] if args.n == 1 else lps
    return out


# ----------------------------------------------------------------------------- command line
def _define_flags(fv=None):
    """One flag per :class:`GenerateArgs` field (same name, same default), plus ``--compilation_cache_dir``."""
    f, d = flags, field_defaults(GenerateArgs)
    fv = flags.FLAGS if fv is None else fv
    f.DEFINE_string("model_dir", None, "HF checkpoint directory (config.json + safetensors + tokenizer)",
                    flag_values=fv)
    f.DEFINE_string("input", None, "input JSONL: {\"id\", \"prompt\"} or {\"id\", \"messages\"} per line",
                    flag_values=fv)
    f.DEFINE_string("output", None, "output JSONL (appended; ids already present are skipped)", flag_values=fv)
    f.DEFINE_string("lora", d["lora"], "PEFT LoRA adapter directory applied on top of --model_dir", flag_values=fv)
    f.DEFINE_string("tokenizer_dir", d["tokenizer_dir"], "tokenizer directory (default: --model_dir)", flag_values=fv)
    f.DEFINE_integer("batch_size", d["batch_size"], "sequences per device batch (prompts per batch = batch_size // n)",
                     flag_values=fv)
    f.DEFINE_integer("max_new_tokens", d["max_new_tokens"], "maximum generated tokens per completion", flag_values=fv)
    f.DEFINE_float("temperature", d["temperature"], "sampling temperature; 0 = greedy", flag_values=fv)
    f.DEFINE_float("top_p", d["top_p"], "nucleus sampling mass (1 = off)", flag_values=fv)
    f.DEFINE_integer("top_k", d["top_k"], "keep the k most likely tokens (0 = off)", flag_values=fv)
    f.DEFINE_integer("seed", d["seed"], "run seed; each record samples with a key derived from it and the record id",
                     flag_values=fv)
    f.DEFINE_integer("n", d["n"], "completions per prompt (output fields become lists)", flag_values=fv)
    f.DEFINE_multi_string("stop", list(d["stop"]), "stop string (repeat the flag for several)", flag_values=fv)
    f.DEFINE_list("stop_token_ids", list(d["stop_token_ids"]), "extra token ids that end a completion, comma separated",
                  flag_values=fv)
    f.DEFINE_bool("logprobs", d["logprobs"], "save the raw log-prob of every generated token", flag_values=fv)
    f.DEFINE_bool("save_token_ids", d["save_token_ids"], "save the generated token ids", flag_values=fv)
    f.DEFINE_bool("chat_template", d["chat_template"],
                  "format 'prompt' records with the chat template (as one user message)", flag_values=fv)
    f.DEFINE_string("system", d["system"], "system message added before 'prompt' records (chat template only)",
                    flag_values=fv)
    f.DEFINE_enum("dtype", d["dtype"], ["float32", "bfloat16"], "parameter and compute dtype", flag_values=fv)
    f.DEFINE_string("mesh", d["mesh"],
                    "device mesh, e.g. 'fsdp=-1' or 'fsdp=4,tensor=2' (default: fsdp over all devices)", flag_values=fv)
    f.DEFINE_integer("max_model_len", d["max_model_len"],
                     "context limit: prompt + new tokens (0 = the model's maximum)", flag_values=fv)
    f.DEFINE_string("compilation_cache_dir", None, "persistent JAX compilation cache directory (faster reruns)",
                    flag_values=fv)
    f.DEFINE_bool("progress", d["progress"], "show a progress bar", flag_values=fv)
    f.DEFINE_enum("batching", d["batching"], ["continuous", "static"],
                  "continuous: rows leave the running batch when done and waiting prompts take their slots; "
                  "static: the batch-level engine (each batch padded to its longest prompt, run to its longest answer)",
                  flag_values=fv)
    f.DEFINE_integer("prefill_budget", d["prefill_budget"],
                     "continuous batching: padded prompt tokens prefilled per scheduler round "
                     "(at least one chunk of one prompt) between decode chunks; small = the rows already decoding "
                     "(and their records) finish sooner, long prompts are read over more rounds", flag_values=fv)
    f.DEFINE_bool("lane_promotion", d["lane_promotion"], LANE_PROMOTION_HELP, flag_values=fv)
    f.DEFINE_enum("scan_layers", d["scan_layers"], ["auto", "true", "false"], SCAN_LAYERS_HELP, flag_values=fv)
    for name in ("model_dir", "input", "output"):
        flags.mark_flag_as_required(name, flag_values=fv)


def args_from_flags(flag_values) -> GenerateArgs:
    """:class:`GenerateArgs` from the parsed flags (one flag per field)."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(GenerateArgs)}
    values["stop_token_ids"] = parse_list(values["stop_token_ids"], int, name="--stop_token_ids")
    return from_mapping(GenerateArgs, values)


def main(argv):
    del argv
    F = flags.FLAGS
    require_single_process("python -m iopo_jax.sampling.generate")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if F.compilation_cache_dir:
        enable_compilation_cache(F.compilation_cache_dir)
    try:
        args = args_from_flags(F)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        summary = run(args)
    except (InputError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "stats"}))


if __name__ == "__main__":
    _define_flags()
    cli.run_app(main)
