"""TFDS builders, the download command and the stats command (network only to 127.0.0.1)."""
import contextlib
import functools
import http.server
import os
import shutil
import socket
import sys
import threading

import numpy as np
import pytest

from data_pipeline import DEMO_DATA_DIR, load_records, tokenize_iopo_group
from data_pipeline import download as dl
from data_pipeline import make_demo, stats

tfds = pytest.importorskip("tensorflow_datasets")


@contextlib.contextmanager
def serve(directory):
    """A static HTTP server on 127.0.0.1 (port 0) for ``directory``; yields its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def closed_port_url(name="x"):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/{name}"


# ---- TFDS --------------------------------------------------------------------------------------------
def _prepare(name, data_dir, manual_dir=None):
    import data_pipeline.tfds_builders  # noqa: F401  (registers the builders)

    b = tfds.builder(name, data_dir=str(data_dir))
    cfg = tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False) if manual_dir else None
    b.download_and_prepare(download_config=cfg)
    return b


def test_tfds_builders_from_manual_dir(tmp_path, shared_data):
    from data_pipeline.tfds_builders import decode_text

    trace = _prepare("trace_eval", tmp_path, shared_data).as_data_source(split="test")
    want, _ = load_records("trace", shared_data / "trace" / "202409_trace_evaluation.jsonl")
    assert len(trace) == 1042
    for i in (0, 1, 517, 1041):
        ex, w = trace[i], want[i]
        assert decode_text(ex["id"]) == w["id"] and int(ex["constraints_num"]) == w["constraints_num"]
        assert [decode_text(c) for c in ex["messages"]["content"]] == [m["content"] for m in w["messages"]]
        assert [decode_text(c) for c in ex["constraints_splits"]] == w["constraints_splits"]
    eif = _prepare("eifbench/party100", tmp_path, shared_data).as_data_source(split="test")
    want, _ = load_records("eifbench", shared_data / "eifbench" / "sorted_party100.json")
    assert len(eif) == 100
    import json
    for i in (0, 99):
        ex = eif[i]
        assert int(ex["main_id"]) == want[i]["main_id"]
        assert json.loads(decode_text(ex["raw_json"])) == want[i]
        keys = [decode_text(k) for k in ex["sub_instructions"]["key"]]
        assert keys == sorted(want[i]["sub_instructions"], key=lambda k: int(k.split("_")[-1]))
        q = json.loads(decode_text(ex["sub_instructions"]["scoring_questions_json"][0]))
        assert q == want[i]["sub_instructions"][keys[0]]["scoring_questions"]
    assert "tensorflow" not in sys.modules
    assert any(f.name.endswith("array_record-00000-of-00001") for f in (tmp_path / "trace_eval" / "1.0.0").iterdir())


def test_tfds_download_manager_and_checks(tmp_path, shared_data, monkeypatch):
    import data_pipeline.tfds_builders as tb

    with serve(shared_data / "trace") as base:
        monkeypatch.setattr(tb, "TRACE_URL", f"{base}/202409_trace_evaluation.jsonl")
        ds = _prepare("trace_eval", tmp_path / "a").as_data_source(split="test")
        assert len(ds) == 1042
    # offline: a quick, clear error
    monkeypatch.setattr(tb, "TRACE_URL", closed_port_url("202409_trace_evaluation.jsonl"))
    with pytest.raises(RuntimeError, match=r"MANUAL_DIR/202409_trace_evaluation.jsonl"):
        _prepare("trace_eval", tmp_path / "b")
    # a manual file with the wrong content fails the sha256 check
    manual = tmp_path / "manual"
    manual.mkdir()
    lines = open(shared_data / "trace" / "202409_trace_evaluation.jsonl", encoding="utf-8").readlines()
    (manual / "202409_trace_evaluation.jsonl").write_text("".join(lines[:10]), encoding="utf-8")
    with pytest.raises(ValueError, match="sha256"):
        _prepare("trace_eval", tmp_path / "c", manual)


# ---- download command ---------------------------------------------------------------------------------
def test_download_command(tmp_path, shared_data, capsys):
    out = tmp_path / "data"
    with serve(shared_data) as base:
        assert dl.main(["trace_eval", "--out", str(out), "--mirror", f"{base}/trace"]) == 0
        assert dl.main(["eifbench", "--out", str(out), "--splits", "party100", "--mirror", f"{base}/eifbench"]) == 0
        assert dl.main(["ifeval", "--out", str(out), "--mirror", f"{base}/ifeval"]) == 0
    log = capsys.readouterr().out
    assert "1042 valid records, sha256 ok" in log and "100 valid records, sha256 ok" in log
    assert "541 valid records, sha256 " in log and "no published hash" in log
    for rel in ("trace/202409_trace_evaluation.jsonl", "eifbench/sorted_party100.json", "ifeval/input_data.jsonl"):
        assert (out / rel).read_bytes() == (shared_data / rel).read_bytes()
    # present files are checked, not fetched again (the mirror is gone now)
    assert dl.main(["trace_eval", "--out", str(out), "--mirror", closed_port_url()]) == 0
    assert "already present" in capsys.readouterr().out


def test_download_offline_and_corrupt(tmp_path, shared_data, capsys):
    rc = dl.main(["ifeval", "--out", str(tmp_path), "--mirror", closed_port_url().rsplit("/", 1)[0], "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "could not download" in err and str(tmp_path / "ifeval" / "input_data.jsonl") in err
    assert not (tmp_path / "ifeval" / "input_data.jsonl.part").exists()
    (tmp_path / "trace").mkdir()
    src = open(shared_data / "trace" / "202409_trace_evaluation.jsonl", "rb").read()
    (tmp_path / "trace" / "202409_trace_evaluation.jsonl").write_bytes(src[:-200])
    assert dl.main(["trace_eval", "--out", str(tmp_path)]) == 1
    assert "does not match the known" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown EIFBench split"):
        dl.targets("eifbench", ["party7"])


# ---- stats command ------------------------------------------------------------------------------------------
def test_stats_trace(shared_data, qwen_tokenizer):
    s = stats.compute_stats(shared_data / "trace" / "202409_trace_evaluation.jsonl", tok=qwen_tokenizer, cutoff_len=512)
    recs, _ = load_records("trace", shared_data / "trace" / "202409_trace_evaluation.jsonl")
    assert s["kind"] == "trace" and s["records"] == 1042
    assert s["constraint_counts"]["constraints"][1] == 200 and sum(s["constraint_counts"]["constraints"].values()) == 1042
    lens = [len(qwen_tokenizer.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + r["messages"][-1]["content"]
        + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)) for r in recs[:50]]
    assert s["lengths"][:50] == lens
    assert s["truncated"] == sum(n > 512 for n in s["lengths"]) > 0
    assert s["length_percentiles"]["p100"] == max(s["lengths"])


def test_stats_iopo_truncation_matches_tokenizer(qwen_tokenizer):
    path = os.path.join(DEMO_DATA_DIR, "iopo_train.json")
    s = stats.compute_stats(path, tok=qwen_tokenizer, cutoff_len=100)
    recs, _ = load_records("iopo", path)
    full = [tokenize_iopo_group(qwen_tokenizer, r, None) for r in recs]
    want_len = [max(len(v["input_ids"]) for k, v in g.items() if k != "truncated") for g in full]
    assert s["lengths"] == want_len
    assert s["truncated"] == sum(tokenize_iopo_group(qwen_tokenizer, r, 100)["truncated"] for r in recs) > 0
    assert s["length_percentiles"]["p50"] == int(np.percentile(want_len, 50))
    dist = s["constraint_counts"]["constraints_x2"]
    groups = make_demo.generate()["iopo"]
    assert dist == dict(sorted(__import__("collections").Counter(len(g["meta"]["x2_constraints"]) for g in groups).items()))


def test_stats_cli_writes_png(tmp_path, capsys, monkeypatch):
    path = os.path.join(DEMO_DATA_DIR, "eval_prompts.jsonl")
    png = tmp_path / "h.png"
    assert stats.main([path, "--tokenizer", "chars", "--png", str(png), "--cutoff_len", "300", "--json"]) == 0
    out = capsys.readouterr().out
    assert "kind: demo_eval" in out and "records: 120 valid" in out and "length in characters" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.chdir(tmp_path / "..")  # nothing is written into the current folder
    bad = tmp_path / "bad.jsonl"
    shutil.copy(path, bad)
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"id": "x", "lang": "en"\n')
    assert stats.main([str(bad), "--tokenizer", "chars", "--skip_invalid"]) == 0
    assert "invalid (skipped): 1 {'json_decode': 1}" in capsys.readouterr().out
    assert (tmp_path / "bad.jsonl.lengths.png").exists()  # next to its input
    assert not os.path.exists("bad.jsonl.lengths.png")
    assert stats.main([str(bad), "--tokenizer=chars", "--skip_invalid", f"--out={tmp_path / 'report'}"]) == 0
    assert (tmp_path / "report" / "bad.jsonl.lengths.png").exists()


@pytest.mark.parametrize("mod", ["download", "stats", "make_demo"])
def test_every_cli_has_help(mod, capsys):
    import importlib

    m = importlib.import_module(f"data_pipeline.{mod}")
    with pytest.raises(SystemExit) as e:
        m.main(["--help"])
    assert e.value.code == 0 and f"python -m data_pipeline.{mod}" in capsys.readouterr().out
