"""The complex-IF data generator (data_pipeline.complex_if): checks every group, held-out prompt and sectioned
prompt with the verifiers, determinism, best-of-n selection (fake sampler; the real sampler on the tiny model)."""
import json

import pytest

from data_pipeline import complex_if as C
from data_pipeline import verifiers as V
from data_pipeline.readers import load_records
from iopo_jax.tools import complex_if as complex_if_cli

SMALL = dict(n_groups=36, n_single=6, n_multi=10, n_dev=6, n_sectioned_train=5, n_sectioned_eval=4)


@pytest.fixture(scope="module")
def small():
    return C.generate(seed=3, **SMALL)


def test_groups_are_verified_pairs_in_both_directions(small):
    assert len(small["iopo"]) == 36
    edits = {g["meta"]["edit"] for g in small["iopo"]}
    assert edits == {"ADD", "DELETE", "REVISE"}
    for g in small["iopo"]:
        m = g["meta"]
        y1, y2 = g["chosen"]["value"], g["rejected"]["value"]
        assert all(V.verify_constraints(m["x1_constraints"], y1))
        assert not all(V.verify_constraints(m["x2_constraints"], y1))
        assert all(V.verify_constraints(m["x2_constraints"], y2))
        assert not all(V.verify_constraints(m["x1_constraints"], y2))  # strict: y2 fails x1 too
        assert g["conversations"][0]["value"] != g["conversations"][1]["value"]
        assert 1 <= len(m["x1_constraints"]) <= C.DEFAULT_MAX_CONSTRAINTS
    assert small["stats"]["answers"]["y2_fails_x1_share"] == 1.0
    assert small["stats"]["answers"]["template_share"] == 1.0


def test_constraint_counts_reach_eight_and_more():
    data = C.generate(seed=5, n_groups=90, n_single=2, n_multi=2, n_dev=3, n_sectioned_train=1, n_sectioned_eval=1)
    counts = {len(g["meta"]["x1_constraints"]) for g in data["iopo"]}
    assert min(counts) == 1 and max(counts) >= 8
    kinds = {s["type"] for g in data["iopo"] for s in g["meta"]["x1_constraints"]}
    assert {"no_commas", "language", "json_format", "paragraph_count", "lowercase"} <= kinds


def test_held_out_prompts_use_unseen_topics_and_combinations(small):
    train_topics = {g["meta"]["topic"] for g in small["iopo"]}
    train_combos = {C.combo(g["meta"][k]) for g in small["iopo"] for k in ("x1_constraints", "x2_constraints")}
    held = set(C.topic_split("en")[1])
    assert not train_topics & held
    for key in ("eval_dev", "eval_test"):
        for r in small[key]:
            assert r["topic"] in held and r["topic"] not in train_topics
            assert V.verify_record(r, r["reference"])["all_pass"]
            if r["category"] == "single":
                assert r["constraints_num"] == 1
            else:
                assert r["constraints_num"] >= 2 and C.combo(r["constraints"]) not in train_combos
    cats = [r["category"] for r in small["eval_test"]]
    assert cats.count("single") == 6 and cats.count("multi") == 10
    assert small["stats"]["eval_test"]["topics_in_training"] == 0


def test_sectioned_prompts_have_the_structure_rl_expects(small):
    from iopo_jax.rl.segments import segment_text  # noqa: F401  (the RL segmentation reads the same headings)

    for r in small["sectioned_train"] + small["sectioned_eval"]:
        subs = r["sub_instructions"]
        assert 2 <= len(subs) <= 4 and all(1 <= len(s["constraints"]) <= 3 for s in subs)
        assert all(f"SUB_INSTRUCTION_{k}:" in r["prompt"] for k in range(1, len(subs) + 1))
        res = V.verify_record(r, r["reference"])
        assert res["all_pass"] and res["format_ok"] and res["ila"] == 1.0
        assert not V.verify_record(r, r["reference"].replace("SUB_INSTRUCTION_2:", "Part two:"))["all_pass"]


def test_deterministic_and_written_files_load(tmp_path):
    a = C.generate(seed=11, **SMALL)
    b = C.generate(seed=11, **SMALL)
    assert json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)
    c = C.generate(seed=12, **SMALL)
    assert c["iopo"][0]["conversations"] != a["iopo"][0]["conversations"] or c["eval_test"] != a["eval_test"]
    paths = C.write(a, str(tmp_path))
    recs, rep = load_records("iopo", paths["iopo"])
    assert len(recs) == 36
    assert len(load_records("dpo", paths["dpo"])[0]) == 72 and len(load_records("sft", paths["sft"])[0]) == 72
    assert len(load_records("demo_eval", paths["eval_test"])[0]) == 16
    assert len(load_records("demo_eval", paths["sectioned_train"])[0]) == 5
    md = (tmp_path / "STATS.md").read_text()
    assert "IOPO groups: 36" in md and "Not covered" in md


def test_best_of_n_keeps_passing_samples_and_falls_back_to_templates():
    seen = {}

    def fake(prompts, seeds):
        # Group g: for even groups answer x1 with (bad, good) where good is a correct, distinct answer.
        out = []
        for i, x in enumerate(prompts):
            seen.setdefault("seeds", []).append(seeds[i])
            out.append([" "] + ([seeds[i] % 2 == 0 and GOOD.get(x) or " "]))  # a blank answer fails every rule
        return out

    base = C.generate(seed=4, n_groups=6, n_single=1, n_multi=1, n_dev=3, n_sectioned_train=1, n_sectioned_eval=1)
    GOOD = {}
    for g in base["iopo"][::2]:
        x1 = g["conversations"][0]["value"]
        GOOD[x1] = "\n" + g["chosen"]["value"] + "\n"  # passes x1, fails x2; differs only in whitespace
    data = C.generate(seed=4, n_groups=6, n_single=1, n_multi=1, n_dev=3, n_sectioned_train=1, n_sectioned_eval=1,
                      sample_fn=fake)
    src = [(g["meta"]["y1_source"], g["meta"]["y2_source"]) for g in data["iopo"]]
    assert src == [("sampled", "template"), ("template", "template")] * 3
    st = data["stats"]["answers"]
    assert st["y1_sampled"] == 3 and st["y2_sampled"] == 0 and st["template_share"] == pytest.approx(9 / 12)
    assert st["y1_sampled_share_of_offered"] == 0.5 and st["y2_sampled_share_of_offered"] == 0.0
    # every group offered 2 candidates per answer; the 3 GOOD y1 answers pass x1 (and fail x2); blanks pass nothing
    assert st["candidates"] == {"y1_candidates": 12, "y1_pass_own": 3, "y1_usable": 3,
                                "y2_candidates": 12, "y2_pass_own": 0, "y2_usable": 0}
    assert "- y1 candidates: 12; pass every constraint of their own instruction 3; usable" in \
        C.stats_markdown(data["stats"])
    assert len(seen["seeds"]) == 12 and len(set(seen["seeds"])) == 12
    # sample_groups bounds what is offered to the sampler
    data2 = C.generate(seed=4, n_groups=6, n_single=1, n_multi=1, n_dev=3, n_sectioned_train=1,
                       n_sectioned_eval=1, sample_fn=fake, sample_groups=2)
    assert [g["meta"]["y1_source"] for g in data2["iopo"]] == ["sampled"] + ["template"] * 5


@pytest.mark.slow
def test_cli_samples_with_the_tiny_model(tiny_model_dir, tmp_path):
    """Best-of-2 through our JAX sampler on the tiny random model: it runs, and its random answers fail."""
    rc = complex_if_cli.main(["--out", str(tmp_path), "--seed", "1", "--groups", "3", "--eval_single", "1",
                              "--eval_multi", "1", "--dev", "3", "--sectioned_train", "1", "--sectioned_eval", "1",
                              "--sample_model", tiny_model_dir, "--best_of", "2", "--max_new_tokens", "6",
                              "--sample_batch", "8", "--noprogress"])
    assert rc == 0
    st = json.loads((tmp_path / "stats.json").read_text())
    assert st["answers"]["groups_offered_to_the_sampler"] == 3
    assert st["params"]["best_of"] == 2
    assert st["answers"]["template_share"] + (st["answers"]["y1_sampled"] + st["answers"]["y2_sampled"]) / 6 == 1.0
    assert st["answers"]["candidates"]["y1_candidates"] == 6 and st["answers"]["candidates"]["y2_candidates"] == 6
