"""bench/dense_dots.py through its command line: every product of a decode step of the model's config,
timed per engine, a dense ceiling that is the sum of those products, and the same products in one program."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dense_dots_products_and_ceiling(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 96, "num_hidden_layers": 3, "vocab_size": 500}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    js = tmp_path / "dots.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "bench/dense_dots.py", f"--model_dir={tmp_path}", "--batch_sizes=2,5",
                           "--repeats=2", "--peak_sizes=64", "--notorch", f"--json_out={js}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["peak_gflops"] > 0 and [b["batch"] for b in res["batches"]] == [2, 5]
    for batch in res["batches"]:
        b = batch["batch"]
        prods = {p["name"]: p for p in batch["products"]}
        # shapes from config.json: head_dim 16, kv width 2 x 16, 3 layers, one LM head
        assert (prods["k"]["d_in"], prods["k"]["d_out"], prods["k"]["per_step"]) == (64, 32, 3)
        assert (prods["down"]["d_in"], prods["down"]["d_out"]) == (96, 64)
        assert (prods["lm_head"]["d_out"], prods["lm_head"]["per_step"]) == (500, 1)
        for engine in ("xla_oi", "xla_io", "numpy"):
            step_s = sum(2 * b * p["d_in"] * p["d_out"] / (p["gflops"][engine] * 1e9) * p["per_step"]
                         for p in prods.values())
            ceil = batch["ceiling"][engine]
            assert abs(ceil["step_ms"] - 1e3 * step_s) < 1e-6 * ceil["step_ms"] + 1e-9
            assert abs(ceil["tokens_per_s"] - b / step_s) < 1e-6 * ceil["tokens_per_s"]
            assert abs(ceil["of_peak"] - ceil["gflops"] / res["peak_gflops"]) < 1e-9
        # the whole step's products in one program: its own timing, same FLOPs per step
        chain = batch["ceiling"]["xla_chain"]
        flops = sum(2 * b * p["d_in"] * p["d_out"] * p["per_step"] for p in prods.values())
        assert chain["step_ms"] > 0 and abs(chain["gflops"] - flops / (chain["step_ms"] / 1e3) / 1e9) < 1e-6 * chain["gflops"]
        assert abs(chain["tokens_per_s"] - b / (chain["step_ms"] / 1e3)) < 1e-6 * chain["tokens_per_s"]
    assert "dense ceiling" in proc.stdout and "xla_chain" in proc.stdout


def test_dense_dots_names_an_unreadable_config(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "bench/dense_dots.py", f"--model_dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "config.json" in proc.stderr
