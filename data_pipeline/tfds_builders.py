"""TFDS builders for the TRACE evaluation set and EIFBench (array_record files, no TensorFlow needed).

    import data_pipeline.tfds_builders  # registers "trace_eval" and "eifbench"
    import tensorflow_datasets as tfds

    b = tfds.builder("trace_eval", data_dir="~/tensorflow_datasets")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/path/with/the/files"))
    ds = b.as_data_source(split="test")      # random access, numpy/bytes values, no TensorFlow
    ds[0]["messages"]["content"]             # -> array of bytes

    tfds.builder("eifbench/party100")         # configs: party100 (default), single450, dialogue450

``download_and_prepare`` reads the official file from ``manual_dir`` when it is there (file names as
upstream: ``202409_trace_evaluation.jsonl``, ``sorted_{party100,single450,dialogue450}.json``; the
directory may also hold them under ``trace/`` or ``eifbench/`` as in ``../shared/data``), otherwise it
downloads it from the upstream URL through the TFDS download manager. The file format defaults to
``array_record``. Every record is validated by :mod:`data_pipeline.readers` (bad records raise,
naming file:line and field). The sha256 of a file is checked where it is known.

Features. ``trace_eval`` (split ``test``, 1,042 examples): ``id``, ``messages`` (sequence of
``{role, content}``), ``description``, ``constraints``, ``input``, ``constraints_num``,
``constraints_splits``, ``levels2``, ``category``, ``type``. ``eifbench`` (split ``test``):
``main_id``, ``input``, ``group``, ``category``, ``task_types``, ``composition_types``, ``instruction``,
``scoring_questions``, ``sub_instructions`` (sequence of ``{key, instruction, scoring_questions_json}``,
``scoring_questions_json`` being the JSON list of that sub-instruction's constraints, since TFDS has no
ragged lists inside sequences without TensorFlow), and ``raw_json`` (the whole original record).
"""
from __future__ import annotations

import json
import os
import urllib.request

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline.hashing import sha256_file
from data_pipeline.readers import load_records
from data_pipeline.sources import EIFBENCH_FILE, EIFBENCH_SPLITS, EIFBENCH_URL, SHA256, TRACE_FILE, TRACE_URL

def check_sha256(path, name: str) -> None:
    want = SHA256.get(name)
    if want is not None:
        got = sha256_file(path)
        if got != want:
            raise ValueError(f"{path}: sha256 {got} does not match the known {want} of {name}; "
                             "the file is corrupt or a different version")


def probe(url: str, timeout: float = 10.0) -> None:
    """Raise (quickly) if ``url`` cannot be reached."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "iopo-jax"})
    with urllib.request.urlopen(req, timeout=timeout):
        pass


def _find_manual(manual_dir, name: str, sub: str):
    if not manual_dir:
        return None
    for cand in (os.path.join(manual_dir, name), os.path.join(manual_dir, sub, name)):
        if os.path.isfile(cand):
            return cand
    return None


def _source(builder, dl_manager, name: str, sub: str, url: str):
    try:
        manual_dir = os.fspath(dl_manager.manual_dir)
    except Exception:  # no manual_dir given (TFDS raises on access)
        manual_dir = None
    path = _find_manual(manual_dir, name, sub)
    if path is None:
        try:
            probe(url)  # fail fast: TFDS's downloader retries for minutes without network
            path = os.fspath(dl_manager.download(url))
        except Exception as e:
            raise RuntimeError(
                f"could not download {url} ({type(e).__name__}: {e}). Without network, get the file "
                f"elsewhere (or run `python -m data_pipeline.download` on a connected machine), put it at "
                f"MANUAL_DIR/{name} and pass DownloadConfig(manual_dir=MANUAL_DIR)") from e
    check_sha256(path, name)
    return path


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
    """Defaults: array_record files and no GCS lookup (both keep TensorFlow out)."""

    def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None, **kw):
        if download_config is None:
            download_config = tfds.download.DownloadConfig(try_download_gcs=False)
        return super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                            file_format=file_format or "array_record", **kw)

    def as_data_source(self, split=None, **kw):
        kw.setdefault("file_format", "array_record")
        return super().as_data_source(split, **kw)


class TraceEval(_ArrayRecordBuilder):
    """TRACE evaluation set (1,042 instructions, mostly Chinese; MIT, Tongyi-CCAI/Complex-IF)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "202409 release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place {TRACE_FILE} (from {TRACE_URL}) in the manual directory."

    def _info(self):
        f = tfds.features
        return self.dataset_info_from_configs(
            description="TRACE complex instruction-following evaluation set.",
            features=f.FeaturesDict({
                "id": f.Text(),
                "messages": f.Sequence({"role": f.Text(), "content": f.Text()}),
                "description": f.Text(),
                "constraints": f.Text(),
                "input": f.Text(),
                "constraints_num": f.Scalar(dtype=np.int32),
                "constraints_splits": f.Sequence(f.Text()),
                "levels2": f.Sequence(f.Text()),
                "category": f.Text(),
                "type": f.Text(),
            }),
            homepage="https://github.com/Tongyi-CCAI/Complex-IF",
            license="MIT",
            disable_shuffling=True,  # keep the official order
        )

    def _split_generators(self, dl_manager):
        path = _source(self, dl_manager, TRACE_FILE, "trace", TRACE_URL)
        return {"test": self._generate_examples(path)}

    def _generate_examples(self, path):
        records, _ = load_records("trace", path)
        for r in records:
            yield str(r["id"]), {
                "id": str(r["id"]),
                "messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
                "description": r["description"],
                "constraints": r["constraints"],
                "input": r["input"],
                "constraints_num": r["constraints_num"],
                "constraints_splits": r["constraints_splits"],
                "levels2": r["levels2"],
                "category": r["category"],
                "type": r.get("type", "trace"),
            }


class Eifbench(_ArrayRecordBuilder):
    """EIFBench multi-task, multi-constraint instances (MIT, Tongyi-CCAI/Complex-IF)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"EIFBench {s} split") for s in EIFBENCH_SPLITS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place sorted_party100.json / sorted_single450.json / sorted_dialogue450.json (from "
        f"{EIFBENCH_URL.format(split='<split>')}) in the manual directory.")

    def _info(self):
        f = tfds.features
        return self.dataset_info_from_configs(
            description="EIFBench: extremely complex instruction following (multi-task, multi-constraint).",
            features=f.FeaturesDict({
                "main_id": f.Scalar(dtype=np.int64),
                "input": f.Text(),
                "group": f.Text(),
                "category": f.Text(),
                "task_types": f.Text(),
                "composition_types": f.Sequence(f.Text()),
                "instruction": f.Text(),
                "scoring_questions": f.Sequence(f.Text()),
                "sub_instructions": f.Sequence({"key": f.Text(), "instruction": f.Text(),
                                                "scoring_questions_json": f.Text()}),
                "raw_json": f.Text(),
            }),
            homepage="https://github.com/Tongyi-CCAI/Complex-IF",
            license="MIT",
            disable_shuffling=True,  # keep the official order
        )

    def _split_generators(self, dl_manager):
        split = self.builder_config.name
        name = EIFBENCH_FILE.format(split=split)
        path = _source(self, dl_manager, name, "eifbench", EIFBENCH_URL.format(split=split))
        return {"test": self._generate_examples(path)}

    def _generate_examples(self, path):
        records, _ = load_records("eifbench", path)
        for i, r in enumerate(records):
            subs = sorted(r["sub_instructions"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))
            yield f"{r['main_id']}-{i}", {
                "main_id": int(r["main_id"]),
                "input": r.get("input", ""),
                "group": str(r.get("group", "")),
                "category": str(r.get("category", "")),
                "task_types": str(r.get("task_types", "")),
                "composition_types": list(r.get("composition_types") or []),
                "instruction": r.get("instruction") or "",
                "scoring_questions": list(r.get("scoring_questions") or []),
                "sub_instructions": [
                    {"key": k, "instruction": v["instruction"],
                     "scoring_questions_json": json.dumps(v["scoring_questions"], ensure_ascii=False)}
                    for k, v in subs],
                "raw_json": json.dumps(r, ensure_ascii=False),
            }


def decode_text(x) -> str:
    """bytes (as returned by ``as_data_source``) -> str."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
