"""Download the official evaluation files from their upstream URLs, check them, and say what to do offline.

    python -m data_pipeline.download trace_eval --out data/
    python -m data_pipeline.download eifbench --out data/ --splits party100,single450,dialogue450
    python -m data_pipeline.download ifeval --out data/

Files land in the layout of ``../shared/data`` (``DIR/trace/202409_trace_evaluation.jsonl``,
``DIR/eifbench/sorted_<split>.json``, ``DIR/ifeval/input_data.jsonl``), so the same paths work in the
evaluation configs and as a TFDS ``manual_dir``. The sha256 is checked where it is known (TRACE,
EIFBench party100) and printed otherwise; every record is then validated. A file that is already in
place is checked and not downloaded again. Without network the command explains where to put the file
(exit status 2); ``--mirror URL`` fetches ``URL/<file name>`` instead of the upstream address.
"""
from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request

from absl import flags

from data_pipeline import cli
from data_pipeline.hashing import sha256_file
from data_pipeline.readers import load_records
from data_pipeline.sources import EIFBENCH_COUNTS, EIFBENCH_SPLITS, EIFBENCH_URL, IFEVAL_URL, SHA256, TRACE_URL


def targets(dataset: str, splits=None) -> list[dict]:
    """What to fetch for ``dataset``: url, relative path, record kind, expected count (None if unknown)."""
    if dataset == "trace_eval":
        return [{"url": TRACE_URL, "rel": "trace/202409_trace_evaluation.jsonl", "kind": "trace", "count": 1042}]
    if dataset == "eifbench":
        splits = splits or list(EIFBENCH_SPLITS)
        bad = [s for s in splits if s not in EIFBENCH_SPLITS]
        if bad:
            raise ValueError(f"unknown EIFBench split(s) {bad}; choose from {', '.join(EIFBENCH_SPLITS)}")
        return [{"url": EIFBENCH_URL.format(split=s), "rel": f"eifbench/sorted_{s}.json", "kind": "eifbench",
                 "count": EIFBENCH_COUNTS[s]} for s in splits]
    if dataset == "ifeval":
        return [{"url": IFEVAL_URL, "rel": "ifeval/input_data.jsonl", "kind": "ifeval", "count": 541}]
    raise ValueError(f"unknown dataset {dataset!r}; choose trace_eval, eifbench or ifeval")


class OfflineError(RuntimeError):
    pass


def fetch(url: str, dest: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` (via a .part file). Raises OfflineError naming the fix."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "iopo-jax"})
        with urllib.request.urlopen(req, timeout=timeout) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise OfflineError(
            f"could not download {url}: {e}.\n"
            f"  Without network: fetch the file on a machine that has network access (e.g. "
            f"`curl -L -o {os.path.basename(dest)} {url}`), copy it to {dest}, and rerun this command "
            f"to check it.") from e
    os.replace(part, dest)


def check_file(path: str, kind: str, count=None) -> tuple[str, int]:
    """sha256 check (where known) and validation of every record. Returns (sha256, number of records)."""
    name = os.path.basename(path)
    got = sha256_file(path)
    want = SHA256.get(name)
    if want is not None and got != want:
        raise ValueError(f"{path}: sha256 {got} does not match the known {want}; delete it and download again")
    records, _ = load_records(kind, path)
    if count is not None and len(records) != count:
        raise ValueError(f"{path}: {len(records)} records, expected {count}")
    return got, len(records)


def download(dataset: str, out: str, splits=None, mirror=None, timeout: float = 60.0, force: bool = False,
             log=print) -> list[str]:
    """Fetch and check every file of ``dataset`` into ``out``; returns their paths."""
    paths = []
    for t in targets(dataset, splits):
        dest = os.path.join(out, t["rel"])
        url = f"{mirror.rstrip('/')}/{os.path.basename(t['rel'])}" if mirror else t["url"]
        if os.path.exists(dest) and not force:
            log(f"{dest}: already present, checking it")
        else:
            log(f"downloading {url} -> {dest}")
            fetch(url, dest, timeout)
        sha, n = check_file(dest, t["kind"], t["count"])
        known = "sha256 ok" if os.path.basename(dest) in SHA256 else f"sha256 {sha} (no published hash to compare)"
        log(f"{dest}: {n} valid records, {known}")
        paths.append(dest)
    return paths


PROG = "python -m data_pipeline.download"
DESCRIPTION = """Download the official TRACE / EIFBench / IFEval files, check sha256 where known, and validate
every record. Without network it says where to put the file.

    python -m data_pipeline.download DATASET --out=DIR [flags]     DATASET: trace_eval | eifbench | ifeval"""
DATASETS = ("trace_eval", "eifbench", "ifeval")


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", None, "output directory (files go to OUT/trace, OUT/eifbench, OUT/ifeval)", flag_values=fv)
    f.DEFINE_list("splits", None, f"EIFBench splits, comma separated (default: all of {','.join(EIFBENCH_SPLITS)})",
                  flag_values=fv)
    f.DEFINE_string("mirror", None, "fetch MIRROR/<file name> instead of the upstream URL", flag_values=fv)
    f.DEFINE_float("timeout", 60.0, "network timeout in seconds", flag_values=fv)
    f.DEFINE_bool("force", False, "download again even if the file is present", flag_values=fv)
    f.mark_flag_as_required("out", flag_values=fv)


def _main(fv, positional) -> int:
    if len(positional) != 1 or positional[0] not in DATASETS:
        raise cli.usage_error(PROG, f"give one DATASET, one of {', '.join(DATASETS)} (got {positional})")
    splits = [s.strip() for s in fv.splits if s.strip()] if fv.splits else None
    try:
        download(positional[0], fv.out, splits, fv.mirror, fv.timeout, fv.force)
    except OfflineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
