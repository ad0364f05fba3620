"""experiments/: the per-method configs, the metric and report code (fast), and the quick mode end to end (slow)."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from experiments import run as R
from experiments.configs import METHODS, get_method_config
from experiments.configs.common import SMOLLM2_SYSTEM, budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_methods_share_lora_data_steps_and_differ_in_objective(tmp_path):
    b = budget("cpu")
    cfgs = {m: get_method_config(m, b, "/m", str(tmp_path), 3e-4, 1) for m in METHODS}
    assert cfgs["base"] is None
    trained = {m: c for m, c in cfgs.items() if c is not None}
    assert {c.objective.name for c in trained.values()} == set(METHODS) - {"base"}
    for m, c in trained.items():
        assert c.model.lora_rank == 8 and c.train.max_steps == b["steps"] and c.optimizer.lr == 3e-4
        assert c.train.seed == 1 and c.model.path == "/m"
        assert c.optimizer.grad_accum == 1  # a step sees batch_groups groups, not 8x that (configs/base.py's default)
        # RL rollouts included: prompts rendered as evaluation renders them (SmolLM2's template and system prompt)
        assert (c.data.template, c.data.system) == ("chatml", SMOLLM2_SYSTEM), m
    assert cfgs["sft"].data.batch_size == cfgs["dpo"].data.batch_size == 2 * cfgs["iopo"].data.batch_size
    assert cfgs["iopo"].data.batch_size == b["batch_groups"]
    assert cfgs["iopo_star"].data.kind == cfgs["iopo_no_input"].data.kind == "iopo"
    assert cfgs["segpo"].rl.prompts_files[0].endswith("sectioned_train.jsonl")
    assert cfgs["segpo"].model.remat == cfgs["grpo"].model.remat == "full"  # the learner's full-length rows fit
    assert cfgs["segpo"].train.max_steps == b["steps"]  # rl_steps 0: as many iterations as steps
    rl = get_method_config("grpo", budget("cpu", rl_steps=7), "/m", str(tmp_path), 3e-4, 1)
    assert rl.train.max_steps == rl.checkpoint.every == 7
    with pytest.raises(ValueError, match="does not exist"):
        budget("cpu", stepz=3)


def _judg(i, all_pass, checks, types, ila=None, cla=1.0, fmt=None):
    return {"id": i, "all_pass": all_pass, "checks": checks, "types": types, "ila": ila, "cla": cla, "format_ok": fmt}


def test_score_aggregate_and_report(tmp_path):
    recs = [{"id": "a", "category": "single"}, {"id": "b", "category": "multi"}, {"id": "c", "category": "multi"},
            {"id": "d", "category": "sectioned"}, {"id": "e", "category": "single"}]
    j = {"a": _judg("a", True, [True], ["lowercase"]),
         "b": _judg("b", False, [True, False], ["lowercase", "word_count"]),
         "c": _judg("c", True, [True, True], ["word_count", "ends_with"]),
         "d": _judg("d", False, [True, False, True], ["x", "y", "z"], ila=0.5, cla=2 / 3, fmt=True)}
    s = R.score(recs, j)
    assert s["n"] == 3 and s["n_missing"] == 1
    assert s["IF"] == pytest.approx(2 / 3) and s["IF-S"] == 1.0 and s["IF-M"] == 0.5
    assert s["constraint_accuracy"] == pytest.approx(4 / 5)
    assert s["per_type"] == {"ends_with": 1.0, "lowercase": 1.0, "word_count": 0.5}
    assert s["sectioned"] == {"n": 1, "ILA": 0.5, "CLA": pytest.approx(2 / 3), "task": 0.0, "format": 1.0}
    assert R.dev_key(s)[0] == pytest.approx(2 / 4)
    s2 = dict(s, IF=1 / 3, **{"IF-S": 0.0})
    results = {"budget_name": "quick", "budget": budget("quick"), "model_dir": "m", "data_dir": "d", "machine": "x",
               "finished": "now", "wall_s": 1.0, "command": "python -m experiments.run --quick",
               "methods": {"base": {"lr": "-", "runs": [{"seed": None, "test": {"scores": s, "wall_s": 2}}]},
                           "iopo": {"lr": 1e-3, "lr_search": [{"lr": 1e-3, "dev_key": [0.5, 0.6, 0], "train_s": 3}],
                                    "runs": [{"seed": 0, "test": {"scores": s, "wall_s": 2}},
                                             {"seed": 1, "test": {"scores": s2, "wall_s": 2}}]}}}
    agg = R.aggregate(results)
    m, sd = agg["iopo"]["IF"]
    assert m == pytest.approx(0.5) and sd == pytest.approx(0.2357, abs=1e-4)
    md = R.markdown(results, agg, {"p": str(tmp_path / "results.png")})
    assert "QUICK MODE" in md and "| iopo | 0.001 | 50.0 ± 23.6 |" in md and "| base | - | 66.7 |" in md
    assert "## Paired comparisons" in md and "| iopo | base | single + multi (3) | 0 / 0 | 1.000 |" in md
    png = R.plot(agg, str(tmp_path / "results.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


QUICK_METHODS = ("base", "iopo", "segpo")  # untrained, preference (Trainer), RL (RLTrainer): CI time


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    """The quick mode on three methods (the other preference objectives share the iopo path; the whole quick
    run is the one recorded in experiments/RESULTS.md)."""
    out = tmp_path / "exp"
    res_md = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "experiments.run", "--quick", "--out", str(out), "--noprogress",
           "--results", str(res_md), "--methods", ",".join(QUICK_METHODS), "--set", "rl_warm_start_steps=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == [R.WARM] + list(QUICK_METHODS)
    # the warm start: SFT on the sectioned references, merged; SegPO trains from it and is judged on top of it
    warm = res["methods"].pop(R.WARM)["runs"][0]
    merged = os.path.join(warm["workdir"], "export", "merged")
    assert os.path.isfile(os.path.join(merged, "model.safetensors"))
    sft_lines = [json.loads(x) for x in open(os.path.join(warm["workdir"], "sft_sectioned.jsonl"))]
    refs = [json.loads(x)["reference"] for x in open(out / "data" / "sectioned_train.jsonl")]
    assert [m["messages"][1]["content"] for m in sft_lines] == refs
    assert warm["test"]["scores"]["sectioned"]["n"] == 4 and warm["test"]["scores"]["n"] == 0
    seg_cfg = json.loads(open(os.path.join(res["methods"]["segpo"]["runs"][0]["workdir"], "config.json")).read())
    assert seg_cfg["model"]["path"] == merged
    seg_eval = json.loads(open(os.path.join(res["methods"]["segpo"]["runs"][0]["workdir"], "eval_test",
                                            "config.json")).read())
    assert merged in json.dumps(seg_eval)
    test_ids = [json.loads(x)["id"] for x in open(out / "prompts" / "test.jsonl")]
    for method, r in res["methods"].items():
        for run in r["runs"]:
            s = run["test"]["scores"]
            assert s["n"] == 10 and s["n_missing"] == 0 and s["sectioned"]["n"] == 4
            for k in ("IF", "IF-S", "IF-M", "constraint_accuracy"):
                assert 0.0 <= s[k] <= 1.0
            # the scores come from this run's own judgments
            wd = os.path.join(run.get("workdir") or str(out / "base"), "eval_test")
            judg = [json.loads(x) for x in open(os.path.join(wd, "judgments.jsonl"))]
            assert [x["id"] for x in judg] == test_ids
            assert s["IF"] == pytest.approx(
                sum(x["all_pass"] for x in judg[:10]) / 10)
            if method != "base":
                assert os.path.isfile(os.path.join(run["workdir"], "export", "adapter", "adapter_model.safetensors"))
    md = res_md.read_text()
    assert "QUICK MODE" in md
    for method in QUICK_METHODS + (R.WARM,):
        assert f"| {method} |" in md
    assert "| segpo | sft_sectioned | sectioned (4) |" in md  # RL against where it started
    assert "| dpo |" not in md
    assert (tmp_path / "results.png").is_file()
    ex = json.loads((out / "segpo" / "segment_example.json").read_text())  # SegPO's advantages on one example
    assert len(ex["rollouts"]) == 4 and ex["adapter"].endswith("adapter") and "## SegPO's advantages" in md
    # rerunning resumes: nothing is trained again
    p2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p2.returncode == 0 and "] training " not in p2.stdout
    # another budget in the same folder is refused
    p3 = subprocess.run(cmd + ["--steps", "5"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p3.returncode != 0 and "steps" in p3.stderr


class _FakeSampler:
    """Returns given answers (as token ids) as the group's rollouts."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts, params):
        assert len(prompts) == 1 and params.n == len(self.texts)
        return [types.SimpleNamespace(token_ids=self.tokenizer.encode(t, add_special_tokens=False))
                for t in self.texts]


def test_segment_example_rewards_and_advantages(tmp_path, qwen_tokenizer):
    """SegPO's per-segment advantages on one prompt (experiments/segment_example.py): the reference answer,
    the reference with its first section emptied, an answer without sections, the reference again."""
    from data_pipeline import complex_if
    from data_pipeline.headings import find_headings
    from experiments import segment_example as E

    complex_if.write(complex_if.generate(7, 4, ("en",), 4, 1, 1, 1, 2, 3, progress=False), str(tmp_path / "d"))
    prompt = E.sectioned_prompts(str(tmp_path / "d" / "sectioned_eval.jsonl"))[0]
    keys = [s.key for s in prompt.slots if s.segment]
    assert len(keys) >= 2
    ref = prompt.record["reference"]
    h = find_headings(ref)
    first_end = ref.index("\n", h[0].start) + 1
    emptied = ref[:first_end] + "\n" + ref[h[1].start:]
    texts = [ref, emptied, "No sections here.", ref]
    ex = E.explain(_FakeSampler(qwen_tokenizer, texts), prompt, group=4, max_new_tokens=8, template="qwen",
                   system=None)
    assert ex["segments"] == keys and len(ex["rollouts"]) == 4
    R = ex["rollouts"]
    assert [r["format"] for r in R] == [True, True, False, True] and R[0]["all_pass"] == 1.0
    r_o = np.array([r["r_o"] for r in R])
    for r in R:
        assert r["r_o"] == pytest.approx(r["ila"] + r["cla"] + r["all_pass"] + float(r["format"]))
    # A_o: r_o normalised over the group (sample std)
    np.testing.assert_allclose([r["A_o"] for r in R], (r_o - r_o.mean()) / (r_o.std(ddof=1) + 1e-6), atol=1e-4)
    # A_phi of segment j: r_phi normalised over the rollouts that have segment j (not rollout 2)
    assert R[1]["segments"][0]["r_phi"] == 0.0 and R[0]["segments"][0]["r_phi"] == 1.0
    for j in range(len(keys)):
        have = [i for i in range(4) if R[i]["segments"][j]["found"]]
        assert have == [0, 1, 3]
        phi = np.array([R[i]["segments"][j]["r_phi"] for i in have])
        want = (phi - phi.mean()) / (phi.std(ddof=1) + 1e-6) if phi.std() > 0 else np.zeros(3)
        np.testing.assert_allclose([R[i]["segments"][j]["A_phi"] for i in have], want, atol=1e-4)
        for i in have:
            s = R[i]["segments"][j]
            assert s["tokens"] > 0 and s["A"] == pytest.approx(R[i]["A_o"] + s["A_phi"], abs=1e-5)
        s = R[2]["segments"][j]
        assert (s["found"], s["tokens"], s["A_phi"]) == (False, 0, None) and s["A"] == pytest.approx(R[2]["A_o"])
    md = E.markdown(ex)
    assert md.count("\n") == 1 + 4 and all(f"{k}: r_phi" in md for k in keys) and "missing" in md


class _ScriptedSampler(_FakeSampler):
    """Returns the next group of answers of a script at each call."""

    def __init__(self, tokenizer, groups):
        super().__init__(tokenizer, groups[0])
        self.groups = list(groups)

    def generate(self, prompts, params):
        self.texts = self.groups.pop(0)
        return super().generate(prompts, params)


def test_segment_example_takes_the_first_prompt_where_the_segment_term_acts(tmp_path, qwen_tokenizer):
    """The example skips prompts whose rollouts all pass or all fail every section (A_phi = 0: SegPO = GRPO)."""
    from data_pipeline import complex_if
    from data_pipeline.headings import find_headings
    from experiments import segment_example as E

    complex_if.write(complex_if.generate(7, 4, ("en",), 4, 1, 1, 1, 2, 3, progress=False), str(tmp_path / "d"))
    prompts = E.sectioned_prompts(str(tmp_path / "d" / "sectioned_eval.jsonl"))
    assert len(prompts) >= 2
    same = ["No sections here."] * 4  # no segment found anywhere: the segment term is 0
    ref = prompts[1].record["reference"]
    h = find_headings(ref)
    emptied = ref[:ref.index("\n", h[0].start) + 1] + "\n" + ref[h[1].start:]
    mixed = [ref, emptied, ref, emptied]  # the first section passes in two rollouts, fails in two
    kw = dict(group=4, max_new_tokens=8, template="qwen", system=None)
    ex = E.explain_first_acting(_ScriptedSampler(qwen_tokenizer, [same, mixed]), prompts, tries=5, **kw)
    assert ex["prompt_id"] == prompts[1].id and ex["passed_over"] == [prompts[0].id] and E.segment_term_acts(ex)
    assert R.passed_over_note(ex).startswith(" It is the first")
    # nowhere acting within the tries: the first prompt, and the report says the update is GRPO's
    ex = E.explain_first_acting(_ScriptedSampler(qwen_tokenizer, [same, same]), prompts, tries=2, **kw)
    assert ex["prompt_id"] == prompts[0].id and ex["passed_over"] == [prompts[1].id]
    assert not E.segment_term_acts(ex) and "equals GRPO's" in R.passed_over_note(ex)


def test_paired_comparisons_and_sign_test():
    assert R.sign_test(0, 0) == 1.0 and R.sign_test(3, 3) == 1.0
    assert R.sign_test(5, 0) == pytest.approx(2 / 32)  # two-sided: 2 * 0.5^5
    assert R.sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert R.sign_test(2, 8) == R.sign_test(8, 2)
    recs = [{"id": i, "category": c} for i, c in (("a", "single"), ("b", "multi"), ("c", "multi"), ("d", "sectioned"))]
    base = R.score(recs, {"a": _judg("a", False, [False], ["t"]), "b": _judg("b", False, [True, False], ["t", "u"]),
                          "c": _judg("c", True, [True, True], ["t", "u"]),
                          "d": _judg("d", False, [False, False], ["t", "u"], ila=0, cla=0, fmt=False)})
    iopo = R.score(recs, {"a": _judg("a", True, [True], ["t"]), "b": _judg("b", True, [True, True], ["t", "u"]),
                          "c": _judg("c", False, [False, True], ["t", "u"]),
                          "d": _judg("d", True, [True, True], ["t", "u"], ila=1, cla=1, fmt=True)})
    c = R.paired(iopo, base, ("single", "multi"))
    assert (c["n"], c["prompt_wins"], c["prompt_losses"], c["constraint_wins"], c["constraint_losses"]) == (3, 2, 1, 2, 1)
    assert c["prompt_p"] == pytest.approx(1.0)
    results = {"methods": {m: {"runs": [{"test": {"scores": s}}]} for m, s in
                           (("base", base), ("iopo", iopo), ("segpo", iopo), ("grpo", base))}}
    rows = {(a, b): (what, cmp) for a, b, what, cmp in R.paired_rows(results)}
    assert set(rows) == {("iopo", "base"), ("segpo", "base"), ("grpo", "base"), ("segpo", "grpo")}
    what, cmp = rows[("segpo", "grpo")]
    assert what == "sectioned" and (cmp["n"], cmp["prompt_wins"], cmp["constraint_wins"]) == (1, 1, 2)
    # IFEval per prompt (strict), where both runs have it
    results["methods"]["base"]["runs"][0]["ifeval"] = {"per_prompt": {"1": ["ifeval", False, [False, True]],
                                                                      "2": ["ifeval", True, [True]]}}
    results["methods"]["iopo"]["runs"][0]["ifeval"] = {"per_prompt": {"1": ["ifeval", True, [True, True]],
                                                                      "2": ["ifeval", True, [True]]}}
    rows = [(a, b, what, c) for a, b, what, c in R.paired_rows(results) if what == "IFEval, strict"]
    assert [(a, b, c["n"], c["prompt_wins"], c["constraint_wins"]) for a, b, _, c in rows] == [("iopo", "base", 2, 1, 1)]
    assert what == "sectioned" and (cmp["n"], cmp["prompt_wins"], cmp["constraint_wins"]) == (1, 1, 2)


def test_rl_methods_on_sectioned_prompts_only_report(tmp_path):
    """--rl_test=sectioned: GRPO/SegPO scored on the sectioned prompts only; their flat columns read '-'."""
    recs = [{"id": "a", "category": "single"}, {"id": "d", "category": "sectioned"}]
    full = R.score(recs, {"a": _judg("a", True, [True], ["t"]),
                          "d": _judg("d", False, [True, False], ["x", "y"], ila=0.5, cla=0.5, fmt=True)})
    sec = R.score(recs[1:], {"d": _judg("d", True, [True, True], ["x", "y"], ila=1.0, cla=1.0, fmt=True)})
    assert sec["n"] == 0 and sec["IF"] is None and sec["sectioned"]["n"] == 1
    results = {"budget_name": "cpu", "budget": budget("cpu"), "model_dir": "m", "data_dir": "d", "machine": "x",
               "finished": "now", "wall_s": 1.0, "command": "c",
               "methods": {"base": {"lr": "-", "runs": [{"seed": None, "test": {"scores": full, "wall_s": 2}}]},
                           "segpo": {"lr": 5e-4, "runs": [{"seed": 0, "test": {"scores": sec, "wall_s": 2}}]}}}
    agg = R.aggregate(results)
    md = R.markdown(results, agg, {"p": R.plot(agg, str(tmp_path / "results.png"))})
    assert "| segpo | 0.0005 | - | - | - | - | 100.0 | 100.0 | 100.0 | 100.0 | 0/1 |" in md
    assert "| segpo | base | sectioned (1) | 1 / 0 | 1.000 | 1 / 0 | 1.000 |" in md


def test_ifeval_reused_with_per_prompt_verdicts(tmp_path):
    """Without --ifeval a finished IFEval evaluation of the run is reported, with its per-prompt verdicts."""
    wd = tmp_path / "ifeval"
    args = types.SimpleNamespace(ifeval="", ifeval_limit=0)
    assert R.ifeval_or_reuse({}, "m", "", args, str(wd), False) is None
    wd.mkdir()
    (wd / "metrics.json").write_text(json.dumps({"n_missing_predictions": 0, "prompt_level_strict": 0.5}))
    (wd / "judgments.jsonl").write_text(
        json.dumps({"id": "7", "status": "ok", "strict": [True, False], "prompt_strict": False}) + "\n" +
        json.dumps({"id": "8", "status": "error"}) + "\n")
    m = R.ifeval_or_reuse({}, "m", "", args, str(wd), False)
    assert m["prompt_level_strict"] == 0.5 and m["per_prompt"] == {"7": ["ifeval", False, [True, False]]}
    (wd / "metrics.json").write_text(json.dumps({"n_missing_predictions": 3}))  # unfinished: not reported
    assert R.ifeval_or_reuse({}, "m", "", args, str(wd), False) is None
