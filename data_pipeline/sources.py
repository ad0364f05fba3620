"""Upstream locations and known sha256 of the official evaluation files (docs/metrics.md)."""
from __future__ import annotations

TRACE_FILE = "202409_trace_evaluation.jsonl"
TRACE_URL = "https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/TRACE/TRACE/" + TRACE_FILE
EIFBENCH_FILE = "sorted_{split}.json"
EIFBENCH_URL = "https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/EIFBench/data/sorted_{split}.json"
EIFBENCH_SPLITS = ("party100", "single450", "dialogue450")
EIFBENCH_COUNTS = {"party100": 100, "single450": 450, "dialogue450": 450}
IFEVAL_FILE = "input_data.jsonl"
IFEVAL_URL = ("https://raw.githubusercontent.com/google-research/google-research/master/"
              "instruction_following_eval/data/input_data.jsonl")
SHA256 = {
    TRACE_FILE: "ca9e7577ee0732021db49ba7cb6ad3632eadb8398b1129fe54d104ded41b78f4",
    "sorted_party100.json": "6113c65701b8a8fd5c5a03e0abb00728a2f865121c919c929d05c9871c5e53f0",
}
