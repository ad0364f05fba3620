"""Errors for bad input records, and the report of skipped ones.

Every problem found in an input file is a :class:`RecordError` that names the file, the line
(and, for JSON list files, the record index) and the field, e.g.::

    data/train.json:12 (record 3): field 'chosen': missing required field [missing_field]

With ``skip_invalid=True`` readers do not raise; they count each skipped record in an
:class:`InvalidReport` by reason, and the report's :meth:`InvalidReport.summary` is printed
in the run summary. Nothing is ever dropped silently.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

# Reason codes used in InvalidReport counts (stable strings, documented in the README).
REASONS = (
    "json_decode",  # the line / file is not valid JSON (e.g. a truncated line)
    "encoding",  # the bytes are not UTF-8
    "missing_field",  # a required field is absent
    "wrong_type",  # a field has the wrong type
    "empty_text",  # a text field is empty or only whitespace
    "wrong_role",  # a conversation turn has an unexpected role
    "bad_structure",  # wrong number of turns, inconsistent counts, unknown layout ...
    "identical_texts",  # IOPO/DPO: the two prompts (or responses) that must differ are equal
    "bad_constraint",  # demo eval: a constraint spec the verifiers cannot check
)


class RecordError(ValueError):
    """A bad input record. ``str(err)`` names ``file:line (record i): field 'f': message [reason]``."""

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        line: Optional[int] = None,
        index: Optional[int] = None,
        field: Optional[str] = None,
        reason: str = "bad_structure",
    ):
        self.message = message
        self.path = path
        self.line = line
        self.index = index
        self.field = field
        self.reason = reason
        super().__init__(self._format())

    @property
    def location(self) -> str:
        loc = str(self.path) if self.path is not None else "<records>"
        if self.line is not None:
            loc += f":{self.line}"
        if self.index is not None:
            loc += f" (record {self.index})"
        return loc

    def _format(self) -> str:
        field = f"field '{self.field}': " if self.field else ""
        return f"{self.location}: {field}{self.message} [{self.reason}]"

    def located(self, *, path=None, line=None, index=None) -> "RecordError":
        """A copy with the location filled in (fields already set are kept)."""
        return RecordError(
            self.message,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            index=self.index if self.index is not None else index,
            field=self.field,
            reason=self.reason,
        )


@dataclasses.dataclass
class InvalidReport:
    """Counts of skipped records by reason, with the first few errors kept as examples."""

    total_seen: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)
    max_examples: int = 10

    @property
    def num_invalid(self) -> int:
        return sum(self.counts.values())

    @property
    def num_valid(self) -> int:
        return self.total_seen - self.num_invalid

    def add(self, err: RecordError) -> None:
        self.counts[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def merge(self, other: "InvalidReport") -> None:
        self.total_seen += other.total_seen
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def to_dict(self) -> dict:
        return {
            "total_seen": self.total_seen,
            "num_valid": self.num_valid,
            "num_invalid": self.num_invalid,
            "invalid_by_reason": dict(sorted(self.counts.items())),
            "examples": list(self.examples),
        }

    def summary(self) -> str:
        """One line (plus examples) for the run summary."""
        if not self.num_invalid:
            return f"{self.total_seen} records read, none invalid"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        lines = [f"{self.total_seen} records read, {self.num_invalid} invalid and skipped ({reasons})"]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)
