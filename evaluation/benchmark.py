"""The ``Benchmark`` protocol and its registry: what :func:`evaluation.runner.evaluate` needs to run one.

A benchmark answers five questions, one method each; the runner does everything else the same way for
all of them (workdir fingerprint, answer generation with resume, judge client, ``metrics.json``,
``report.md``, the console summary):

* :meth:`Benchmark.load` - the items to evaluate, read and validated from ``config.data.path``, with the
  data files and prompt templates that identify the run (:class:`Loaded`).
* :meth:`Benchmark.gen_units` - what to sample for each item (:class:`evaluation.driver.GenUnit`: the
  chat messages of each model call).
* :meth:`Benchmark.judge` - the judgment of each answer, written to ``judgments.jsonl``. Two kinds:
  :class:`LLMJudgedBenchmark` (an OpenAI-compatible judge asked through the resumable
  :func:`evaluation.driver.run_judging`) and :class:`RuleJudgedBenchmark` (a function of the item and the
  answer, e.g. rule verifiers).
* :meth:`Benchmark.metrics` - the metrics dictionary (``metrics.json`` without ``usage``,
  ``generation_stats`` and ``run``, which the runner adds).
* :meth:`Benchmark.report_section` and :meth:`Benchmark.summary` - the benchmark's part of ``report.md``
  and its console line.
* :attr:`Benchmark.headline` and :attr:`Benchmark.breakdowns` - the metrics ``python -m evaluation.compare``
  sets side by side for two runs (:class:`Breakdown`: one table per breakdown); compare only formats them.

Implementations: :mod:`evaluation.trace`, :mod:`evaluation.eifbench`, :mod:`evaluation.ifeval` and
:mod:`evaluation.demo`, each registering its class with :func:`register`. To add a benchmark, subclass
one of the two kinds, decorate it with ``@register`` and import its module in :mod:`evaluation.runner`;
``--config.benchmark=NAME`` then selects it.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable, ClassVar, Optional, Sequence

from data_pipeline.schema import parse_list
from evaluation import driver
from evaluation import generate
from iopo_jax import chat_client
from iopo_jax import io_utils


@dataclasses.dataclass
class Loaded:
    """What :meth:`Benchmark.load` read."""

    items: list[Any]  # the items to evaluate, in evaluation order
    files: list[str]  # data files (their sha256 goes into the workdir fingerprint; basenames into the report)
    templates: dict[str, Optional[str]] = dataclasses.field(default_factory=dict)  # texts; None = default
    fingerprint_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more fields that fix a run
    spec: Any = None  # the benchmark's prompt settings (templates, system prompt, ...), if any


METRIC_KINDS = ("rate", "score", "count")  # how a metric is printed: a share in percent, a mean score, a number
Metric = tuple[str, str]  # (key in metrics.json or in a breakdown's row, kind: one of METRIC_KINDS)


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """A breakdown of ``metrics.json`` that ``evaluation.compare`` puts in a table: ``metrics[key]`` maps row
    names to dicts holding ``fields``."""

    key: str  # e.g. "by_split"
    title: str  # what the rows are, e.g. "split"
    fields: tuple[Metric, ...]  # the columns compared
    gloss: bool = False  # row names are TRACE dimension labels, glossed in English (evaluation.report.gloss)


class Benchmark(abc.ABC):
    """One benchmark (see module docstring); ``evaluation.runner`` drives it."""

    name: ClassVar[str]  # the value of config.benchmark
    llm_judge: ClassVar[bool] = False  # judged by the OpenAI-compatible judge of config.judge
    headline: ClassVar[tuple[Metric, ...]] = ()  # the headline metrics evaluation.compare sets side by side
    breakdowns: ClassVar[tuple[Breakdown, ...]] = ()  # and its breakdown tables, in this order

    @abc.abstractmethod
    def load(self, config) -> Loaded:
        """Reads and validates the items (errors name file, line and field)."""

    @abc.abstractmethod
    def gen_units(self, loaded: Loaded) -> list[driver.GenUnit]:
        """One generation unit per item (ids are the item ids used in predictions.jsonl)."""

    @abc.abstractmethod
    def judge(self, config, loaded: Loaded, predictions: dict[str, str],
              client: Optional[chat_client.ChatClient]) -> dict[str, dict[str, Any]]:
        """Judges the answers, writing ``judgments.jsonl`` in ``config.workdir``; ``{unit id: judgment}``."""

    @abc.abstractmethod
    def metrics(self, config, loaded: Loaded, judgments: dict[str, dict[str, Any]],
                n_missing_predictions: int) -> dict[str, Any]:
        """The metrics (``metrics["benchmark"] == self.name``)."""

    @abc.abstractmethod
    def run_info(self, config, backend: str) -> dict[str, Any]:
        """The benchmark's rows of the report's run table (between ``answers`` and ``finished``)."""

    @abc.abstractmethod
    def report_section(self, metrics: dict[str, Any], workdir: str, charts: bool) -> str:
        """The benchmark's markdown in report.md (and its PNG charts in ``workdir`` when ``charts``)."""

    @abc.abstractmethod
    def summary(self, metrics: dict[str, Any]) -> str:
        """The console line(s) printed at the end of a run."""

    # Answers: the backends of :mod:`evaluation.generate`; a benchmark may add its own (demo: "reference").
    def resolve_backend(self, config) -> str:
        return generate.resolve_backend(config)

    def make_generator(self, config, backend: str, loaded: Loaded):
        return generate.make_generator(config, backend, config.workdir)

    def model_name(self, config, backend: str) -> str:
        return generate.model_name(config, backend)


class LLMJudgedBenchmark(Benchmark):
    """A benchmark judged by an LLM: judge prompts per answer, a reply parser, resumable judging."""

    llm_judge = True

    @abc.abstractmethod
    def judge_units(self, loaded: Loaded, predictions: dict[str, str]) -> list[driver.JudgeUnit]:
        """The judge requests for the answered items."""

    @abc.abstractmethod
    def parse(self, unit: driver.JudgeUnit, text: str) -> driver.Parsed:
        """Parses one judge reply (a rejected reply is asked again, then counted as unparseable)."""

    def judge(self, config, loaded, predictions, client):
        j = config.judge
        return driver.run_judging(self.judge_units(loaded, predictions), client, self.parse,
                                  os.path.join(config.workdir, "judgments.jsonl"),
                                  max_parse_retries=j.max_parse_retries, concurrency=j.concurrency,
                                  progress=config.progress)

    def run_info(self, config, backend):
        j = config.judge
        return {"judge": f"{j.model}",
                "judge template": os.path.basename(j.template) if j.template else "default (ours)"}


class RuleJudgedBenchmark(Benchmark):
    """A benchmark whose judge is a function of the item and its answer (no network).

    Its work is three functions of its items, usually its module's, set as static methods:
    ``item_units(items)`` (one generation unit per item), ``judge_record(item, response)`` (one
    judgments.jsonl line) and ``item_metrics(items, judgments, n_missing_predictions=N)``; a subclass may
    override :meth:`gen_units` and :meth:`metrics` instead of setting ``item_units`` and ``item_metrics``."""

    check_progress_desc: ClassVar[Optional[str]] = None  # a progress bar over the checks, when named
    item_units: ClassVar[Callable[[Sequence[Any]], list[driver.GenUnit]]]
    item_metrics: ClassVar[Callable[..., dict[str, Any]]]

    @abc.abstractmethod
    def judge_record(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        """One judgments.jsonl line for an item and its answer."""

    def gen_units(self, loaded):
        return self.item_units(loaded.items)

    def metrics(self, config, loaded, judgments, n_missing_predictions):
        return self.item_metrics(loaded.items, judgments, n_missing_predictions=n_missing_predictions)

    def judge(self, config, loaded, predictions, client):
        todo = [r for r in loaded.items if r["id"] in predictions]
        bar = driver.progress_bar(len(todo), self.check_progress_desc or "",
                                  bool(config.progress and self.check_progress_desc))
        judgments = {}
        for r in todo:
            judgments[r["id"]] = self.judge_record(r, predictions[r["id"]])
            bar.update(1)
        bar.close()
        io_utils.write_jsonl_atomic(os.path.join(config.workdir, "judgments.jsonl"),
                                    [judgments[r["id"]] for r in todo])
        return judgments


REGISTRY: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: makes ``cls`` selectable as ``config.benchmark = cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"benchmark {cls.name!r} is registered twice ({REGISTRY[cls.name].__module__}, "
                         f"{cls.__module__})")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> Benchmark:
    """A new instance of the registered benchmark ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"config.benchmark must be one of {', '.join(sorted(REGISTRY))}, got {name!r}")
    return REGISTRY[name]()


def data_files(config, hint: str, *, single: bool = False) -> list[str]:
    """The comma-separated files of ``config.data.path``, each checked to exist (``hint``: where to get them)."""
    paths = list(parse_list(config.data.path, name="config.data.path"))
    if not paths:
        raise ValueError(f"pass --config.data.path=FILE for {config.benchmark} ({hint})")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{config.benchmark} data file not found: {p} ({hint})")
    if single and len(paths) != 1:
        raise ValueError(f"{config.benchmark} takes one data file, got {len(paths)}: {config.data.path}")
    return paths


def read_template(path: str, what: str) -> Optional[str]:
    """The text of a template file, or None for "" (the benchmark's default template)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} template file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def rate(xs: Sequence[bool]) -> Optional[float]:
    """Share of true values; None for an empty list."""
    return (sum(xs) / len(xs)) if xs else None
