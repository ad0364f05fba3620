"""Readers and validators for every input format of the project.

Entry point::

    records, report = load_records(kind, paths, skip_invalid=False)

``kind`` is one of :data:`KINDS`; ``paths`` is a file, a directory (all ``*.json`` / ``*.jsonl``
files in it, sorted), a glob, a HF ``datasets`` id written ``hf:owner/name`` (``hf:owner/name@split``;
needs network), or a list of these. JSON files hold a list of records (or one record); JSONL files
hold one record per line. Every record is checked; a bad one raises :class:`RecordError` naming
``file:line (record i)`` and the field, or, with ``skip_invalid=True``, is counted in the returned
:class:`InvalidReport` by reason.

Normalised record layouts (training kinds; ``system`` is ``None`` when the file gives none, and the
chat template's default system prompt is then used):

- ``iopo``: ``{"id", "x1", "x2", "y1", "y2", "system"}`` from the sharegpt "ranking" layout
  (``conversations`` = two human turns x1, x2; ``chosen`` = y1; ``rejected`` = y2). Turns may be
  written ``{"from": "human"|"gpt", "value"}`` or ``{"role": "user"|"assistant", "content"}``.
- ``dpo``: ``{"id", "prompt", "chosen", "rejected", "system"}`` from ``prompt/chosen/rejected``
  (strings, or message lists) or from sharegpt with one human turn.
- ``sft``: ``{"id", "system", "turns": [[user, assistant], ...]}`` from ``messages`` (role/content)
  or sharegpt ``conversations``; turns alternate user/assistant and end with the assistant.

Evaluation kinds keep their original fields (validated): ``trace`` (TRACE evaluation JSONL),
``eifbench`` (EIFBench JSON), ``ifeval`` (IFEval JSONL) and ``demo_eval`` (the bundled demo
evaluation prompts, see :mod:`data_pipeline.make_demo`).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from data_pipeline import verifiers
from data_pipeline.errors import InvalidReport, RecordError

KINDS = ("iopo", "dpo", "sft", "trace", "eifbench", "ifeval", "demo_eval")
TRAIN_KINDS = ("iopo", "dpo", "sft")

PathLike = Union[str, os.PathLike]

_USER_ROLES = {"human": "user", "user": "user"}
_ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant"}
_SYSTEM_ROLES = {"system": "system"}
_HF_PREFIX = "hf:"


# --------------------------------------------------------------------------------------------
# File reading: raw JSON objects with their location.
# --------------------------------------------------------------------------------------------
class _Raw:
    __slots__ = ("obj", "path", "line", "index", "error")

    def __init__(self, obj=None, path=None, line=None, index=None, error=None):
        self.obj, self.path, self.line, self.index, self.error = obj, path, line, index, error


def expand_paths(paths: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Files for ``paths``: files kept, directories expanded to their sorted *.json/*.jsonl, globs expanded.

    ``hf:`` ids are passed through. Raises FileNotFoundError naming the missing path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if p.startswith(_HF_PREFIX):
            out.append(p)
        elif os.path.isdir(p):
            found = sorted(
                os.path.join(p, f)
                for f in os.listdir(p)
                if f.endswith((".json", ".jsonl")) and os.path.isfile(os.path.join(p, f))
            )
            if not found:
                raise FileNotFoundError(f"directory {p} holds no .json or .jsonl files")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no file matches {p}")
            out.extend(found)
        else:
            hint = ""
            if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.\[\]:%-]+)?", p):
                hint = f" (for a HF datasets id write hf:{p})"
            raise FileNotFoundError(f"input not found: {p}{hint}")
    return out


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(
            f"file is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-encode it as UTF-8",
            path=path,
            line=line,
            field="(file encoding)",
            reason="encoding",
        ) from None


def _iter_jsonl(data: bytes, path: str) -> Iterator[_Raw]:
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield _Raw(path=path, line=lineno, error=RecordError(
                f"line is not UTF-8 (byte 0x{raw_line[e.start]:02x} at column {e.start + 1})",
                path=path, line=lineno, field="(file encoding)", reason="encoding"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _Raw(path=path, line=lineno, error=RecordError(
                f"invalid JSON ({e.msg} at column {e.colno}); is the line truncated?",
                path=path, line=lineno, field="(json)", reason="json_decode"))
            continue
        yield _Raw(obj, path, lineno)


def _iter_json(data: bytes, path: str) -> Iterator[_Raw]:
    try:
        text = _decode(data, path)
    except RecordError as e:
        yield _Raw(path=path, line=e.line, error=e)
        return
    stripped = text.lstrip()
    start = len(text) - len(stripped)
    if not stripped:
        yield _Raw(path=path, line=1, error=RecordError(
            "file is empty", path=path, line=1, field="(json)", reason="json_decode"))
        return
    if stripped[0] == "{":
        # One object, or JSON Lines written with a .json suffix.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(data, path)
            return
        yield _Raw(obj, path, _line_of(text, start))
        return
    if stripped[0] != "[":
        yield _Raw(path=path, line=_line_of(text, start), error=RecordError(
            "expected a JSON list of records (or one object per line)",
            path=path, line=_line_of(text, start), field="(json)", reason="json_decode"))
        return
    # Walk the top-level list element by element so each record knows its line.
    dec = json.JSONDecoder()
    pos = start + 1
    n = len(text)
    index = 0
    line_pos, line_no = 0, 1  # incremental line counting

    def line_at(p: int) -> int:
        nonlocal line_pos, line_no
        line_no += text.count("\n", line_pos, p)
        line_pos = p
        return line_no

    ws = " \t\r\n"
    while True:
        while pos < n and text[pos] in ws:
            pos += 1
        if pos < n and text[pos] == "]":
            pos += 1
            while pos < n and text[pos] in ws:
                pos += 1
            if pos != n:
                yield _Raw(path=path, line=line_at(pos), error=RecordError(
                    "extra data after the end of the JSON list",
                    path=path, line=line_at(pos), field="(json)", reason="json_decode"))
            return
        if index > 0:
            if pos < n and text[pos] == ",":
                pos += 1
                while pos < n and text[pos] in ws:
                    pos += 1
            else:
                yield _Raw(path=path, line=line_at(min(pos, n)), index=index, error=RecordError(
                    "invalid JSON (expected ',' or ']'; is the file truncated?); "
                    "the rest of this file could not be read",
                    path=path, line=line_at(min(pos, n)), index=index, field="(json)",
                    reason="json_decode"))
                return
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield _Raw(path=path, line=line_at(pos), index=index, error=RecordError(
                f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno}; is the file truncated?); "
                "the rest of this file could not be read",
                path=path, line=line_at(pos), index=index, field="(json)", reason="json_decode"))
            return
        yield _Raw(obj, path, line_at(pos), index)
        index += 1
        pos = end


def _iter_hf(spec: str) -> Iterator[_Raw]:
    name = spec[len(_HF_PREFIX):]
    split = "train"
    if "@" in name:
        name, split = name.split("@", 1)
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown id ...
        raise RuntimeError(
            f"could not load HF dataset {name!r} split {split!r}: {type(e).__name__}: {e}. "
            "Without network, download the files elsewhere and pass the local path instead."
        ) from e
    for i, row in enumerate(ds):
        yield _Raw(dict(row), spec, None, i)


def iter_raw(paths: Union[PathLike, Sequence[PathLike]]) -> Iterator[_Raw]:
    """Raw JSON objects (or located errors) of every input, in order."""
    for path in expand_paths(paths):
        if path.startswith(_HF_PREFIX):
            yield from _iter_hf(path)
            continue
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".jsonl"):
            yield from _iter_jsonl(data, path)
        else:
            yield from _iter_json(data, path)


# --------------------------------------------------------------------------------------------
# Field checks. They raise RecordError without a location; load_records adds it.
# --------------------------------------------------------------------------------------------
def _err(field, message, reason):
    return RecordError(message, field=field, reason=reason)


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {str: "string", int: "integer", list: "list", dict: "object", bool: "boolean",
            float: "number"}.get(t, t.__name__)


def _get(rec: dict, key: str, types, field: Optional[str] = None, required: bool = True):
    field = field or key
    if key not in rec or rec[key] is None:
        if required:
            raise _err(field, "missing required field", "missing_field")
        return None
    val = rec[key]
    if types is int and isinstance(val, bool):
        raise _err(field, f"expected {_type_name(types)}, got boolean", "wrong_type")
    if not isinstance(val, types):
        raise _err(field, f"expected {_type_name(types)}, got {type(val).__name__}", "wrong_type")
    return val


def _text(rec: dict, key: str, field: Optional[str] = None, required: bool = True,
          allow_empty: bool = False) -> Optional[str]:
    val = _get(rec, key, str, field, required)
    if val is not None and not allow_empty and not val.strip():
        raise _err(field or key, "empty text", "empty_text")
    return val


def _check_text_value(val, field: str) -> str:
    if not isinstance(val, str):
        raise _err(field, f"expected string, got {type(val).__name__}", "wrong_type")
    if not val.strip():
        raise _err(field, "empty text", "empty_text")
    return val


def _turn(turn: Any, field: str) -> tuple[str, str]:
    """(role, text) of a sharegpt ({from, value}) or OpenAI ({role, content}) turn."""
    if not isinstance(turn, dict):
        raise _err(field, f"expected a turn object, got {type(turn).__name__}", "wrong_type")
    if "from" in turn or "value" in turn:
        rk, ck = "from", "value"
    else:
        rk, ck = "role", "content"
    role = _get(turn, rk, str, f"{field}.{rk}")
    text = _text(turn, ck, f"{field}.{ck}")
    canon = _USER_ROLES.get(role) or _ASSISTANT_ROLES.get(role) or _SYSTEM_ROLES.get(role)
    if canon is None:
        raise _err(f"{field}.{rk}", f"unknown role {role!r}", "wrong_role")
    return canon, text


def _expect_role(role: str, want: str, field: str):
    if role != want:
        raise _err(field, f"expected a {want} turn, got a {role} turn", "wrong_role")


def _role_key(turn: dict) -> str:
    return "from" if isinstance(turn, dict) and ("from" in turn or "value" in turn) else "role"


def _response(rec: dict, key: str) -> str:
    """A response given as a string, one assistant turn, or a list holding one assistant turn."""
    if key not in rec or rec[key] is None:
        raise _err(key, "missing required field", "missing_field")
    val = rec[key]
    if isinstance(val, str):
        return _check_text_value(val, key)
    if isinstance(val, list):
        if len(val) != 1:
            raise _err(key, f"expected one assistant turn, got {len(val)} turns", "bad_structure")
        val, key = val[0], f"{key}[0]"
    if isinstance(val, dict):
        role, text = _turn(val, key)
        _expect_role(role, "assistant", f"{key}.{_role_key(val)}")
        return text
    raise _err(key, f"expected a string or an assistant turn, got {type(val).__name__}", "wrong_type")


def _split_system(turns: list, field: str) -> tuple[Optional[str], list]:
    """Strip a leading system turn; return (system, remaining turns with their original indices)."""
    out = []
    system = None
    for i, t in enumerate(turns):
        role, text = _turn(t, f"{field}[{i}]")
        if role == "system":
            if i != 0:
                raise _err(f"{field}[{i}].{_role_key(t)}", "a system turn is only allowed first", "wrong_role")
            system = text
            continue
        out.append((i, role, text, t))
    return system, out


def _system_field(rec: dict, system_from_turns: Optional[str]) -> Optional[str]:
    system = _get(rec, "system", str, required=False)
    if system is not None and system_from_turns is not None:
        raise _err("system", "given both as a field and as a system turn", "bad_structure")
    return system if system is not None else system_from_turns


def validate_iopo(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    convs = _get(rec, "conversations", list)
    system, turns = _split_system(convs, "conversations")
    if len(turns) != 2:
        raise _err("conversations", f"expected two human turns (x1, x2), got {len(turns)} turns", "bad_structure")
    xs = []
    for i, role, text, t in turns:
        _expect_role(role, "user", f"conversations[{i}].{_role_key(t)}")
        xs.append(text)
    y1 = _response(rec, "chosen")
    y2 = _response(rec, "rejected")
    if xs[0] == xs[1]:
        raise _err("conversations", "x1 and x2 are identical; x2 must edit x1's constraints", "identical_texts")
    if y1 == y2:
        raise _err("rejected", "chosen (y1) and rejected (y2) are identical", "identical_texts")
    return {"x1": xs[0], "x2": xs[1], "y1": y1, "y2": y2, "system": _system_field(rec, system)}


def validate_dpo(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    system_t = None
    if "conversations" in rec:
        convs = _get(rec, "conversations", list)
        system_t, turns = _split_system(convs, "conversations")
        if len(turns) != 1:
            raise _err("conversations", f"expected one human turn, got {len(turns)} turns", "bad_structure")
        i, role, prompt, t = turns[0]
        _expect_role(role, "user", f"conversations[{i}].{_role_key(t)}")
    elif "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, list):
            system_t, turns = _split_system(p, "prompt")
            if len(turns) != 1:
                raise _err("prompt", f"expected one user message, got {len(turns)}", "bad_structure")
            i, role, prompt, t = turns[0]
            _expect_role(role, "user", f"prompt[{i}].{_role_key(t)}")
        else:
            prompt = _text(rec, "prompt")
    else:
        raise _err("prompt", "missing required field (or 'conversations' for the sharegpt layout)", "missing_field")
    chosen = _response(rec, "chosen")
    rejected = _response(rec, "rejected")
    if chosen == rejected:
        raise _err("rejected", "chosen and rejected are identical", "identical_texts")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": _system_field(rec, system_t)}


def validate_sft(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    if "messages" in rec:
        key = "messages"
    elif "conversations" in rec:
        key = "conversations"
    else:
        raise _err("messages", "missing required field (or 'conversations' for the sharegpt layout)", "missing_field")
    msgs = _get(rec, key, list)
    system_t, turns = _split_system(msgs, key)
    if not turns:
        raise _err(key, "no user/assistant turns", "bad_structure")
    pairs = []
    for j, (i, role, text, t) in enumerate(turns):
        want = "user" if j % 2 == 0 else "assistant"
        _expect_role(role, want, f"{key}[{i}].{_role_key(t)}")
        if want == "user":
            pairs.append([text, None])
        else:
            pairs[-1][1] = text
    if pairs[-1][1] is None:
        raise _err(key, "the conversation must end with an assistant turn", "bad_structure")
    return {"system": _system_field(rec, system_t), "turns": pairs}


def _str_list(rec: dict, key: str, field: Optional[str] = None, nonempty_items: bool = True,
              required: bool = True) -> Optional[list]:
    field = field or key
    val = _get(rec, key, list, field, required)
    if val is None:
        return None
    for i, v in enumerate(val):
        if not isinstance(v, str):
            raise _err(f"{field}[{i}]", f"expected string, got {type(v).__name__}", "wrong_type")
        if nonempty_items and not v.strip():
            raise _err(f"{field}[{i}]", "empty text", "empty_text")
    return val


def validate_trace(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    rid = _get(rec, "id", (str, int))
    msgs = _get(rec, "messages", list)
    roles = []
    for i, m in enumerate(msgs):
        role, _ = _turn(m, f"messages[{i}]")
        roles.append(role)
    if not roles or roles[-1] != "user":
        raise _err("messages", "the last message must be the user instruction", "wrong_role")
    for i, r in enumerate(roles[:-1]):
        if r != "system":
            raise _err(f"messages[{i}].role", f"expected a system message before the user message, got {r}",
                       "wrong_role")
    _text(rec, "description", allow_empty=True)
    _text(rec, "constraints")
    _text(rec, "input", allow_empty=True)
    n = _get(rec, "constraints_num", int)
    if n < 1:
        raise _err("constraints_num", f"must be >= 1, got {n}", "bad_structure")
    splits = _str_list(rec, "constraints_splits")
    if len(splits) != n:
        raise _err("constraints_splits", f"{len(splits)} items but constraints_num is {n}", "bad_structure")
    _str_list(rec, "levels2")
    _text(rec, "category")
    del rid
    return rec


def validate_eifbench(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    _get(rec, "main_id", (int, str))
    _text(rec, "input", allow_empty=True)
    subs = _get(rec, "sub_instructions", dict)
    if not subs:
        raise _err("sub_instructions", "no sub-instructions", "bad_structure")
    for k, v in subs.items():
        f = f"sub_instructions.{k}"
        if not re.fullmatch(r"sub_instruction_\d+", k):
            raise _err(f, "keys must be written sub_instruction_<k>", "bad_structure")
        if not isinstance(v, dict):
            raise _err(f, f"expected an object, got {type(v).__name__}", "wrong_type")
        _text(v, "instruction", f"{f}.instruction")
        qs = _str_list(v, "scoring_questions", f"{f}.scoring_questions")
        if not qs:
            raise _err(f"{f}.scoring_questions", "no constraints (scoring questions)", "bad_structure")
    _str_list(rec, "scoring_questions", required=False)
    _text(rec, "instruction", required=False, allow_empty=True)
    return rec


def validate_ifeval(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    _get(rec, "key", (int, str))
    _text(rec, "prompt")
    ids = _str_list(rec, "instruction_id_list")
    kw = _get(rec, "kwargs", list)
    if len(kw) != len(ids):
        raise _err("kwargs", f"{len(kw)} items but instruction_id_list has {len(ids)}", "bad_structure")
    for i, k in enumerate(kw):
        if not isinstance(k, dict):
            raise _err(f"kwargs[{i}]", f"expected an object, got {type(k).__name__}", "wrong_type")
    return rec


def validate_demo_eval(rec: dict) -> dict:
    if not isinstance(rec, dict):
        raise _err("(record)", f"expected an object, got {type(rec).__name__}", "wrong_type")
    _get(rec, "id", (str, int))
    lang = _get(rec, "lang", str)
    if lang not in ("en", "zh"):
        raise _err("lang", f"expected 'en' or 'zh', got {lang!r}", "bad_structure")
    _text(rec, "prompt")

    def check_specs(obj, field):
        specs = _get(obj, "constraints", list, f"{field}constraints")
        texts = _str_list(obj, "constraints_text", f"{field}constraints_text")
        if len(texts) != len(specs):
            raise _err(f"{field}constraints_text", f"{len(texts)} items but constraints has {len(specs)}",
                       "bad_structure")
        for i, s in enumerate(specs):
            try:
                verifiers.check_spec(s)
            except ValueError as e:
                raise _err(f"{field}constraints[{i}]", str(e), "bad_constraint") from None
        return specs

    n = len(check_specs(rec, ""))
    subs = _get(rec, "sub_instructions", list, required=False) or []
    for j, s in enumerate(subs):
        f = f"sub_instructions[{j}]."
        if not isinstance(s, dict):
            raise _err(f[:-1], f"expected an object, got {type(s).__name__}", "wrong_type")
        key = _text(s, "key", f + "key")
        if key != f"SUB_INSTRUCTION_{j + 1}":
            raise _err(f + "key", f"expected 'SUB_INSTRUCTION_{j + 1}', got {key!r}", "bad_structure")
        _text(s, "instruction", f + "instruction")
        n += len(check_specs(s, f))
    if n == 0:
        raise _err("constraints", "the record has no constraints", "bad_structure")
    return rec


VALIDATORS: dict[str, Callable[[dict], dict]] = {
    "iopo": validate_iopo,
    "dpo": validate_dpo,
    "sft": validate_sft,
    "trace": validate_trace,
    "eifbench": validate_eifbench,
    "ifeval": validate_ifeval,
    "demo_eval": validate_demo_eval,
}


def _record_id(raw: _Raw) -> str:
    base = os.path.basename(raw.path) if raw.path and not raw.path.startswith(_HF_PREFIX) else raw.path
    if raw.line is not None:
        return f"{base}:{raw.line}"
    return f"{base}[{raw.index}]"


def load_records(
    kind: str,
    paths: Union[PathLike, Sequence[PathLike]],
    skip_invalid: bool = False,
) -> tuple[list[dict], InvalidReport]:
    """Read and validate every record of ``paths`` as ``kind`` (one of :data:`KINDS`).

    Returns ``(records, report)``. Training kinds are normalised (see the module docstring) and get an
    ``id`` (``file:line`` or ``file[index]``); evaluation kinds keep their own fields. A bad record
    raises :class:`RecordError` unless ``skip_invalid``; then it is counted in ``report``.
    """
    if kind not in VALIDATORS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    validate = VALIDATORS[kind]
    report = InvalidReport()
    out: list[dict] = []
    for raw in iter_raw(paths):
        report.total_seen += 1
        if raw.error is not None:
            if not skip_invalid:
                raise raw.error
            report.add(raw.error)
            continue
        try:
            rec = validate(raw.obj)
        except RecordError as e:
            e = e.located(path=raw.path, line=raw.line, index=raw.index)
            if not skip_invalid:
                raise e from None
            report.add(e)
            continue
        if kind in TRAIN_KINDS:
            rec = {"id": _record_id(raw), **rec}
        out.append(rec)
    return out, report


def detect_kind(obj: dict) -> str:
    """Best guess of the record kind of one raw record (used by ``python -m data_pipeline.stats``)."""
    if not isinstance(obj, dict):
        raise ValueError("cannot detect the kind of a non-object record")
    if "sub_instructions" in obj and "main_id" in obj:
        return "eifbench"
    if "constraints_splits" in obj or ("messages" in obj and "constraints_num" in obj):
        return "trace"
    if "instruction_id_list" in obj:
        return "ifeval"
    if "constraints_text" in obj and "lang" in obj:
        return "demo_eval"
    if "chosen" in obj and "rejected" in obj:
        convs = obj.get("conversations")
        if isinstance(convs, list):
            n_users = sum(
                1 for t in convs if isinstance(t, dict) and (t.get("from") or t.get("role")) in _USER_ROLES
            )
            return "iopo" if n_users == 2 else "dpo"
        return "dpo"
    if "messages" in obj or "conversations" in obj:
        return "sft"
    raise ValueError(f"cannot detect the record kind from fields {sorted(obj)}")


def detect_kind_of_paths(paths) -> str:
    """Kind of the first readable record of ``paths``."""
    for raw in iter_raw(paths):
        if raw.error is None:
            return detect_kind(raw.obj)
    raise ValueError(f"no readable record in {paths}")


def iter_records(kind: str, records: Iterable[dict]) -> Iterator[dict]:
    """Validate in-memory records (raises RecordError naming the index)."""
    validate = VALIDATORS[kind]
    for i, r in enumerate(records):
        try:
            yield validate(r)
        except RecordError as e:
            raise e.located(index=i) from None
