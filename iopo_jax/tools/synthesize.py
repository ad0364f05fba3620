"""Command line of the IOPO group synthesis (:mod:`data_pipeline.synthesize`, whose doc is the help text) over
OpenAI-compatible LLMs: the pipeline stays in ``data_pipeline``, which does not depend on ``iopo_jax``; this
command gives it the chat client (:class:`iopo_jax.chat_client.ChatClient`).

    python -m iopo_jax.tools.synthesize --input=seeds.jsonl --workdir=/tmp/synth --expand_k=3 \\
        --gen_base_url=http://127.0.0.1:8000/v1 --gen_model=SmolLM2-135M-Instruct
"""
from __future__ import annotations

import logging
import sys
import types
from typing import Optional, Sequence

from absl import flags

from data_pipeline import cli
from data_pipeline import synthesize as S
from iopo_jax.chat_client import BudgetExhaustedError, ChatClient, ChatError, ClientConfig


def make_client(prefix: str, args, store_path: str):
    """A ChatClient for ``--{prefix}_*``."""
    g = lambda k: getattr(args, f"{prefix}_{k}")  # noqa: E731
    cfg = ClientConfig(base_url=g("base_url"), model=g("model"), api_key_env=g("api_key_env") or "",
                       temperature=g("temperature"), top_p=g("top_p"), max_tokens=g("max_tokens"),
                       timeout_s=args.timeout_s, concurrency=args.concurrency, max_retries=args.max_retries,
                       backoff_base_s=args.backoff_base_s, request_budget=args.request_budget,
                       price_prompt_per_1k=g("price_prompt_per_1k"),
                       price_completion_per_1k=g("price_completion_per_1k"),
                       store_path=store_path, store_prompts=True, name=prefix)
    return ChatClient(cfg)


CONNECTOR = S.Connector(make=make_client, budget_error=BudgetExhaustedError, request_error=ChatError)


PROG = "python -m iopo_jax.tools.synthesize"


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("input", None, "seed instructions: .jsonl, .json (list) or .txt (one task per line)",
                    flag_values=fv)
    f.DEFINE_string("workdir", None, "directory for stage files, response stores and the report", flag_values=fv)
    f.DEFINE_string("output", None, "IOPO file written by the 'write' stage (default: <workdir>/iopo.json)",
                    flag_values=fv)
    cli.define_list("stages", ["all"], f"comma-separated stages to run ({', '.join(S.STAGES)}) or 'all' (expand "
                    "runs only with --expand_k > 0)", fv, choices=(*S.STAGES, "all"))
    f.DEFINE_bool("force", False, "rerun stages whose output file already exists (the outputs of later stages are "
                  "then removed, they were computed from the old output)", flag_values=fv)
    f.DEFINE_integer("seed", 0, "seed of every random choice (dimensions, edit ops, rule parameters); per item, so "
                     "results do not depend on --concurrency", flag_values=fv)
    f.DEFINE_enum("lang", "en", ["en", "zh"], "language of rule-constraint wording and of the constraints the "
                  "generator is asked to write", flag_values=fv)
    f.DEFINE_integer("expand_k", 0, "constraints added to each seed by 'expand' (0 = no expand)", flag_values=fv)
    f.DEFINE_float("rule_fraction", 0.5, "expand: probability that a dimension with a rule template gets a "
                   "rule-verifiable constraint (1 = always; others are written by the generator)", flag_values=fv)
    f.DEFINE_bool("expand_rule_only", False, "expand: draw only dimensions that have rule templates (with "
                  "--rule_fraction=1 no LLM is needed for expand, judge, edit)", flag_values=fv)
    f.DEFINE_string("edit_mix", "add:1,delete:1,revise:1", "relative weights of the edit operations, e.g. "
                    "'add:2,revise:1' (0 disables one)", flag_values=fv)
    f.DEFINE_enum("edit_with", "auto", ["auto", "rules", "llm"], "auto: rule edits when every constraint is a rule "
                  "spec and one applies, else the generator; rules: rule edits only; llm: always the generator",
                  flag_values=fv)
    f.DEFINE_enum("judge_mode", "auto", ["auto", "rules", "llm"], "rules: rule verifiers only (free-text "
                  "constraints -> dropped as unverifiable); llm: the LLM judges every constraint; auto: rules where "
                  "possible, LLM for the rest", flag_values=fv)
    f.DEFINE_bool("coherence_check", True, "check: ask the judge LLM whether the four pairings are coherent (needs a "
                  "judge endpoint; --nocoherence_check skips it)", flag_values=fv)
    f.DEFINE_bool("strict_pairs", False, "check: also require that y2 fails x1 (drops every ADD group, whose y2 "
                  "meets x1 too)", flag_values=fv)
    f.DEFINE_integer("parse_retries", 1, "fresh judge/check answers asked for when a reply cannot be parsed",
                     flag_values=fv)
    f.DEFINE_string("templates_dir", None, "directory of <name>.txt files replacing prompt templates "
                    f"({', '.join(S.DEFAULT_TEMPLATES)})", flag_values=fv)
    for prefix, what in (("gen", "generator (answers, expand, edit)"), ("judge", "judge (verdicts, check)")):
        dflt = " (default: the generator's)" if prefix == "judge" else ""
        f.DEFINE_string(f"{prefix}_base_url", None, f"{what}: OpenAI-compatible base URL, e.g. "
                        f"http://127.0.0.1:8000/v1{dflt}", flag_values=fv)
        f.DEFINE_string(f"{prefix}_model", None, f"{what}: model name{dflt}", flag_values=fv)
        f.DEFINE_string(f"{prefix}_api_key_env", None, f"{what}: NAME of the env var holding the API key (the key is "
                        f"never logged){dflt}", flag_values=fv)
        f.DEFINE_float(f"{prefix}_temperature", 0.7 if prefix == "gen" else 0.0, f"{what}: sampling temperature",
                       flag_values=fv)
        f.DEFINE_float(f"{prefix}_top_p", 1.0, f"{what}: top_p", flag_values=fv)
        f.DEFINE_integer(f"{prefix}_max_tokens", 1024 if prefix == "gen" else 512,
                         f"{what}: completion token cap (0 = the server's default)", flag_values=fv)
        f.DEFINE_float(f"{prefix}_price_prompt_per_1k", 0.0, f"{what}: price per 1K prompt tokens (for the cost "
                       "report)", flag_values=fv)
        f.DEFINE_float(f"{prefix}_price_completion_per_1k", 0.0, f"{what}: price per 1K completion tokens",
                       flag_values=fv)
    f.DEFINE_integer("concurrency", 8, "items processed (and requests in flight per client) at once", flag_values=fv)
    f.DEFINE_float("timeout_s", 120.0, "socket timeout per request, seconds", flag_values=fv)
    f.DEFINE_integer("max_retries", 6, "retries per request (timeouts, 429, 5xx, bad bodies)", flag_values=fv)
    f.DEFINE_float("backoff_base_s", 1.0, "first retry delay (doubles per retry)", flag_values=fv)
    f.DEFINE_integer("request_budget", 0, "max HTTP requests per client in this run (0 = no cap); when spent the run "
                     "stops with exit code 3 and a rerun continues", flag_values=fv)
    f.DEFINE_bool("progress", True, "progress bars on stderr (--noprogress: none)", flag_values=fv)
    f.mark_flag_as_required("workdir", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    fv, positional = cli.parse(PROG, S.__doc__, define_flags, sys.argv[1:] if argv is None else argv)
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return S.run(types.SimpleNamespace(**fv.flag_values_dict()), CONNECTOR)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    cli.run(main)
