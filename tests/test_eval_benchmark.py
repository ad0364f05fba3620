"""The Benchmark protocol: registry, one runner for any registered benchmark, judge config from its section."""
import ast
import json
import pathlib

import pytest

from configs import eval_demo, eval_eifbench, eval_ifeval, eval_trace
from evaluation import benchmark, driver, runner
from evaluation import compare as compare_lib
from iopo_jax import chat_client
from iopo_jax import io_utils

EVAL_DIR = pathlib.Path(__file__).resolve().parent.parent / "evaluation"


def test_registry_holds_the_four_benchmarks():
    assert sorted(benchmark.REGISTRY) == ["demo", "eifbench", "ifeval", "trace"]
    for name, cls in benchmark.REGISTRY.items():
        bench = benchmark.get(name)
        assert isinstance(bench, cls) and bench.name == name
    assert benchmark.get("trace").llm_judge and benchmark.get("eifbench").llm_judge
    assert not benchmark.get("demo").llm_judge and not benchmark.get("ifeval").llm_judge
    with pytest.raises(ValueError, match="demo, eifbench, ifeval, trace, got 'nope'"):
        benchmark.get("nope")


def test_compare_columns_of_every_benchmark_have_a_known_kind():
    for cls in benchmark.REGISTRY.values():
        kinds = [k for _, k in cls.headline] + [k for bd in cls.breakdowns for _, k in bd.fields]
        assert set(kinds) <= set(benchmark.METRIC_KINDS), cls.name
    assert [k for k, _ in benchmark.REGISTRY["trace"].headline][:3] == ["IF-S", "IF-M", "IF"]


def test_registering_another_class_under_a_taken_name_fails():
    class Other(benchmark.RuleJudgedBenchmark):  # pylint: disable=abstract-method
        name = "trace"

    with pytest.raises(ValueError, match="registered twice"):
        benchmark.register(Other)
    assert benchmark.REGISTRY["trace"].__module__ == "evaluation.trace"


@pytest.mark.parametrize("mod", [eval_trace, eval_eifbench, eval_demo, eval_ifeval])
def test_judge_section_matches_client_config_field_for_field(mod, tmp_path):
    c = mod.get_config()
    cfg = runner.judge_client_config(c, str(tmp_path))
    for key in c.judge.keys():
        if key not in runner.JUDGE_PROTOCOL_FIELDS:
            assert getattr(cfg, key) == c.judge[key], key
    assert cfg.store_path == str(tmp_path / "judge_cache.jsonl") and cfg.name == "judge"


def test_from_mapping_names_unknown_missing_and_doubled_fields():
    full = {f: getattr(chat_client.ClientConfig(), f) for f in chat_client.ClientConfig.__dataclass_fields__}
    assert chat_client.ClientConfig.from_mapping(full) == chat_client.ClientConfig()
    with pytest.raises(ValueError, match=r"config\.judge does not match ClientConfig: unknown fields: colour"):
        chat_client.ClientConfig.from_mapping({**full, "colour": 1}, section="config.judge")
    partial = {k: v for k, v in full.items() if k != "top_p"}
    with pytest.raises(ValueError, match="missing fields: top_p"):
        chat_client.ClientConfig.from_mapping(partial)
    with pytest.raises(ValueError, match="set twice: name"):
        chat_client.ClientConfig.from_mapping(full, name="x")
    assert chat_client.ClientConfig.from_mapping({**full, "extra": 1}, ignore=("extra",)) == chat_client.ClientConfig()


class _Lengths(benchmark.RuleJudgedBenchmark):
    """A toy benchmark: an answer passes when it is at most ``limit`` characters long."""

    name = "toy_lengths"
    headline = (("pass", "rate"), ("n_items", "count"))

    def load(self, config):
        items = [{"id": str(i), "prompt": f"say {i}", "limit": 3 + i} for i in range(4)]
        return benchmark.Loaded(items=items, files=[config.data.path])

    def gen_units(self, loaded):
        return driver.user_prompt_units(loaded.items)

    def judge_record(self, item, response):
        return {"id": item["id"], "status": "ok", "pass": len(response) <= item["limit"]}

    def metrics(self, config, loaded, judgments, n_missing_predictions):
        return {"benchmark": self.name, "n_items": len(loaded.items), "n_missing_predictions": n_missing_predictions,
                "pass": benchmark.rate([j["pass"] for j in judgments.values()])}

    def run_info(self, config, backend):
        return {"judge": "length rule"}

    def report_section(self, metrics, workdir, charts):
        return f"pass rate {metrics['pass']}\n"

    def summary(self, m):
        return f"TOY pass {m['pass']}"


def test_one_runner_drives_a_newly_registered_benchmark(tmp_path, capsys):
    benchmark.register(_Lengths)
    try:
        data = tmp_path / "toy.txt"
        data.write_text("toy\n")
        preds = tmp_path / "preds.jsonl"
        preds.write_text("".join(json.dumps({"id": str(i), "response": "x" * 5}) + "\n" for i in range(3)))
        c = eval_demo.get_config()
        c.benchmark, c.workdir, c.progress = "toy_lengths", str(tmp_path / "run"), False
        c.data.path, c.generation.predictions = str(data), str(preds)
        m = runner.evaluate(c)
        # limits 3, 4, 5 for the three answered items of 5 characters: one passes; item 3 has no answer.
        assert m["pass"] == pytest.approx(1 / 3) and m["n_missing_predictions"] == 1
        assert m["run"]["judge"] == "length rule" and m["run"]["answers"] == "predictions file preds.jsonl"
        assert "TOY pass 0.333" in capsys.readouterr().out
        run = tmp_path / "run"
        assert [j["pass"] for j in io_utils.read_jsonl(str(run / "judgments.jsonl"))] == [False, False, True]
        assert json.loads((run / "metrics.json").read_text())["benchmark"] == "toy_lengths"
        assert "pass rate 0.333" in (run / "report.md").read_text()
        assert "judge" not in json.loads((run / "config.json").read_text())["fingerprint"]
        # evaluation.compare takes its columns from the benchmark class
        md = compare_lib.compare_markdown(m, {**m, "pass": 1.0, "n_items": 5}, "a", "b")
        assert "| pass | 33.3 | 100.0 | +66.7 |" in md and "| n_items | 4 | 5 | +1 |" in md
    finally:
        benchmark.REGISTRY.pop("toy_lengths", None)


def _evaluation_imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("name", ["benchmark", "trace", "eifbench", "ifeval", "demo", "driver", "generate", "report"])
def test_benchmark_modules_do_not_import_the_runner(name):
    """The runner imports the benchmarks, never the other way round (the demo <-> runner cycle is gone)."""
    imports = _evaluation_imports(EVAL_DIR / f"{name}.py")
    assert not {"evaluation.runner", "evaluation.run"} & imports, imports
