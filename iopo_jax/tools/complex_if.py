"""Command line of the complex-instruction data generator (:mod:`data_pipeline.complex_if`), with best-of-n
answers from a model through the JAX sampler (``--sample_model``); the data logic stays in ``data_pipeline``,
which does not depend on ``iopo_jax``: it receives the sampling function built here.

    python -m iopo_jax.tools.complex_if --out data/complex_if --seed 2026                 # templated answers
    python -m iopo_jax.tools.complex_if --out data/complex_if --best_of 4 --sample_groups 500 \\
        --sample_model ~/.cache/iopo_jax/models/smollm2-135m-instruct   # best-of-n from a model
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from absl import flags

from data_pipeline import cli
from data_pipeline import complex_if as C
from iopo_jax.sampling import Sampler, SamplingParams


def make_sample_fn(model_dir: str, n: int, temperature: float, max_new_tokens: int, batch_size: int,
                   progress: bool = True) -> C.SampleFn:
    """A function answering user prompts ``n`` times each with our JAX sampler (chat template of the model)."""
    sampler = Sampler.from_pretrained(os.path.expanduser(model_dir), max_batch_size=batch_size)
    params = SamplingParams(temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens, n=n, seed=0)

    def fn(prompts: Sequence[str], seeds: Sequence[int]) -> list:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

        out = []
        chunk = max(1, batch_size // n) * 4
        for i in tqdm(range(0, len(prompts), chunk), desc=f"best-of-{n} sampling", disable=not progress,
                      unit="chunk"):
            convs = [[{"role": "user", "content": x}] for x in prompts[i:i + chunk]]
            comps = sampler.generate(convs, params, seeds=list(seeds[i:i + chunk]))
            out += [[c.text for c in comps[j * n:(j + 1) * n]] for j in range(len(convs))]
        return out

    return fn


PROG = "python -m iopo_jax.tools.complex_if"
DESCRIPTION = ("Generate rule-verifiable complex-instruction data: IOPO groups (x2 from x1 by ADD / DELETE / REVISE), "
               "SFT and DPO views, held-out IF-S/IF-M-like prompts on unseen topics and constraint combinations, and "
               "sectioned (SUB_INSTRUCTION_k) prompts for GRPO/SegPO. Deterministic from --seed (with "
               "--sample_model: for a given model and sampler).")


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", None, "output directory (files listed in the doc of data_pipeline.complex_if)",
                    flag_values=fv)
    f.DEFINE_integer("seed", C.DEFAULT_SEED, "random seed", flag_values=fv)
    f.DEFINE_integer("groups", C.DEFAULT_GROUPS, "IOPO groups", flag_values=fv)
    cli.define_list("langs", ["en"], "comma list of languages, en and/or zh", fv, choices=C.LANGS)
    f.DEFINE_integer("max_constraints", C.DEFAULT_MAX_CONSTRAINTS, "most constraints of x1 and of a held-out prompt, "
                     "1..9 (x2 may have one more with --nostrict)", flag_values=fv)
    f.DEFINE_integer("eval_single", C.DEFAULT_EVAL_SINGLE, "held-out test prompts with one constraint",
                     flag_values=fv)
    f.DEFINE_integer("eval_multi", C.DEFAULT_EVAL_MULTI, "held-out test prompts with 2+ constraints",
                     flag_values=fv)
    f.DEFINE_integer("dev", C.DEFAULT_DEV, "held-out dev prompts for the learning-rate search", flag_values=fv)
    f.DEFINE_integer("sectioned_train", C.DEFAULT_SECTIONED_TRAIN, "sectioned prompts on training topics",
                     flag_values=fv)
    f.DEFINE_integer("sectioned_eval", C.DEFAULT_SECTIONED_EVAL, "sectioned prompts on held-out topics",
                     flag_values=fv)
    f.DEFINE_bool("strict", True, "y2 must fail x1, so no whole-constraint ADD edits (--nostrict allows them; their "
                  "y2 necessarily also passes x1)", flag_values=fv)
    f.DEFINE_string("sample_model", "", "HF model directory to answer x1/x2 with (best-of-n, verifiers as judge); "
                    "'' = templated answers only", flag_values=fv)
    f.DEFINE_integer("best_of", 4, "samples per prompt with --sample_model", flag_values=fv)
    f.DEFINE_integer("sample_groups", -1, "offer only the first N groups to the sampler (-1 = all), to bound the "
                     "sampling time", flag_values=fv)
    f.DEFINE_float("temperature", 0.7, "sampling temperature", flag_values=fv)
    f.DEFINE_integer("max_new_tokens", 160, "answer length cap in tokens", flag_values=fv)
    f.DEFINE_integer("sample_batch", 32, "rows per sampler batch", flag_values=fv)
    f.DEFINE_bool("progress", True, "progress bars on stderr (--noprogress: none)", flag_values=fv)
    f.mark_flag_as_required("out", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, positional = cli.parse(PROG, DESCRIPTION, define_flags, sys.argv[1:] if argv is None else argv)
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    t0 = time.time()
    sample_fn = None
    if args.sample_model:
        if args.best_of < 1:
            raise SystemExit("--best_of must be >= 1")
        sample_fn = make_sample_fn(args.sample_model, args.best_of, args.temperature, args.max_new_tokens,
                                   args.sample_batch, progress=args.progress)
    data = C.generate(args.seed, args.groups, args.langs,
                    args.max_constraints, args.eval_single, args.eval_multi, args.dev, args.sectioned_train,
                    args.sectioned_eval, strict=args.strict, sample_fn=sample_fn,
                    sample_groups=args.sample_groups, progress=args.progress)
    if args.sample_model:
        data["stats"]["params"].update(sample_model=args.sample_model, best_of=args.best_of,
                                       temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    data["stats"]["wall_time_s"] = round(time.time() - t0, 1)
    paths = C.write(data, args.out)
    for key, path in paths.items():
        n = len(data[key]) if key in data and isinstance(data[key], list) else ""
        print(f"{n!s:>6} {key:16s} -> {path}")
    print(C.stats_markdown(data["stats"]))
    return 0


if __name__ == "__main__":
    cli.run(main)
