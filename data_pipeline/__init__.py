"""iopo-jax data pipeline: files -> validated records -> token-exact, static-shape numpy batches.

Public API (everything the trainer and the evaluation need)::

    from data_pipeline import (load_records, InvalidReport, RecordError,          # reading + validation
                               tokenize_iopo_group, tokenize_dpo_pair, tokenize_sft, infer_seqlen,
                               TokenizedDataset, BatchIterator, make_buckets,      # tokenised data + batches
                               DataConfig, build_data, split_validation,           # one-call setup
                               verifiers)                                          # rule-checked constraints

    records, report = load_records("iopo", "data_pipeline/demo_data/iopo_train.json")
    groups = tokenize_iopo_group(tok, records[0], cutoff_len=2048)   # chosen_v1, rejected_v1, chosen_v2, rejected_v2
    data = build_data(DataConfig(kind="iopo", train_files=[...], val_fraction=0.1, cutoff_len=2048,
                                 batch_size=8, cache_dir="/tmp/iopo_cache"), tok)
    batch = next(data.train)  # input_ids/labels/segment_ids/attention_mask/positions [B*K, L], valid, example_index
    state = data.train.get_state(); data.train.set_state(state)

Modules: :mod:`~data_pipeline.readers` (formats and validators), :mod:`~data_pipeline.tokenizer` (HF
tokenizers; the real Qwen2 tokenizer built offline), :mod:`~data_pipeline.templates` (Qwen / Llama-3
chat templates), :mod:`~data_pipeline.tokenization` (encoding and joint truncation, the sequence order
of each kind), :mod:`~data_pipeline.hashing` (sha256 digests and seeds),
:mod:`~data_pipeline.dataset` (flat arrays + on-disk cache), :mod:`~data_pipeline.batching` (buckets,
packing, resumable iterator), :mod:`~data_pipeline.pipeline` (config -> iterators, validation split,
host sharding), :mod:`~data_pipeline.verifiers` (rule verifiers), :mod:`~data_pipeline.make_demo` (demo
set generator), :mod:`~data_pipeline.tfds_builders` (TFDS builders ``trace_eval`` and ``eifbench``),
and the CLIs ``python -m data_pipeline.download``, ``python -m data_pipeline.stats``,
``python -m data_pipeline.make_demo``, ``python -m data_pipeline.tokenizer`` (each has ``--help``).
:mod:`~data_pipeline.synthesize` (IOPO group synthesis over an OpenAI-compatible LLM) and
:mod:`~data_pipeline.complex_if` (complex-instruction data) are driven by commands of the layer above, which
give them the model: ``python -m iopo_jax.tools.synthesize`` and ``python -m iopo_jax.tools.complex_if``.
"""
import os as _os

from data_pipeline import verifiers
from data_pipeline.batching import BatchIterator, bucket_for, make_buckets, pack_rows
from data_pipeline.dataset import TokenizedDataset, tokenizer_fingerprint
from data_pipeline.errors import InvalidReport, RecordError
from data_pipeline.pipeline import DataBundle, DataConfig, build_data, column_shard, fresh_val_iterator, shard_indices, split_validation
from data_pipeline.readers import KINDS, detect_kind, load_records
from data_pipeline.templates import LLAMA3, QWEN, ChatTemplate, get_template
from data_pipeline.tokenization import (
    IGNORE_INDEX,
    SEQUENCE_NAMES,
    infer_seqlen,
    tokenize_dpo_pair,
    tokenize_iopo_group,
    tokenize_record,
    tokenize_sft,
)

DEMO_DATA_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "demo_data")
"""The bundled demo set: iopo_train.json, sft_train.jsonl, dpo_train.json, eval_prompts.jsonl."""

__all__ = [
    "BatchIterator", "ChatTemplate", "DataBundle", "DataConfig", "DEMO_DATA_DIR", "IGNORE_INDEX", "InvalidReport",
    "KINDS", "LLAMA3", "QWEN", "RecordError", "SEQUENCE_NAMES", "TokenizedDataset", "bucket_for", "build_data",
    "detect_kind", "fresh_val_iterator", "get_template", "infer_seqlen", "load_records", "make_buckets",
    "pack_rows", "column_shard", "shard_indices", "split_validation", "tokenize_dpo_pair", "tokenize_iopo_group",
    "tokenize_record", "tokenize_sft", "tokenizer_fingerprint", "verifiers",
]
