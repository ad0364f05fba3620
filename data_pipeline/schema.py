"""One schema per config section: a dataclass built from an ml_collections section (or a dict), field for field.

The configs in ``configs/`` are ml_collections ``ConfigDict`` s (overridable on the command line); the code
reads them through dataclasses. :func:`from_mapping` builds the dataclass from its section: every key must
be a field (an unknown one fails, naming the section and the field), a missing field takes the dataclass
default, which equals the section's default in ``configs/base.py`` (tests/test_config_schema.py checks it).

:func:`parse_list` is the one parser of list-valued fields: configs hold tuples
(``model.lora_targets = ("q_proj", "v_proj")``), and a comma string from the command line
(``--config.model.lora_targets=q_proj,v_proj``) or an older config means the same tuple.

This module has no dependency (the bottom layer: data_pipeline and iopo_jax both use it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Type, TypeVar

T = TypeVar("T")


def section_dict(section: Any) -> dict:
    """A plain dict of a section: a ConfigDict (``to_dict``), a mapping, or None (empty)."""
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def from_mapping(cls: Type[T], section: Any, where: str = "", exclude: tuple = (), *, complete: bool = False,
                 **overrides: Any) -> T:
    """``cls(**section, **overrides)``, checking the keys against the dataclass's fields.

    An unknown key raises ``ValueError`` naming ``config.<where>`` (or ``where`` itself when it already starts
    with ``config.``), the keys and the valid fields; a key also set in ``overrides`` raises; a missing key
    takes the dataclass default, or raises when ``complete`` (the section must then hold every field that
    ``overrides`` does not set, so the two cannot drift apart). An instance of ``cls`` is returned as it is.
    ``exclude``: keys of the section that are not fields of ``cls`` and are dropped (e.g. settings of the
    caller or a nested section read by another dataclass)."""
    if isinstance(section, cls):
        return section
    values = {k: v for k, v in section_dict(section).items() if k not in exclude}
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = [(what, keys) for what, keys in (
        ("unknown fields", sorted(set(values) - fields)),
        ("missing fields", sorted(fields - set(values) - set(overrides)) if complete else []),
        ("set twice", sorted(set(values) & set(overrides)))) if keys]
    if problems:
        where = where if where.startswith("config.") else f"config.{where}" if where else cls.__name__
        raise ValueError(f"{where} does not match {cls.__name__}: "
                         + "; ".join(f"{what}: {', '.join(keys)}" for what, keys in problems)
                         + f" (the fields of {cls.__name__} are {', '.join(sorted(fields))})")
    return cls(**values, **overrides)


def field_defaults(cls: Type) -> dict:
    """``{field: default}`` of a dataclass (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def parse_list(value: Any, item: Callable[[str], Any] = str, name: str = "") -> tuple:
    """A list-valued config field as a tuple. Configs hold tuples; a comma string means the same list, also
    inside a tuple: ml_collections turns the command-line override ``--config.model.lora_targets=q_proj,v_proj``
    (not a Python literal) into ``("q_proj,v_proj",)``. Blanks are dropped, ``""``/None give ``()``; ``item``
    converts each element (e.g. ``int``), an error names the field."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else (value,)
    parts = []
    for x in items:
        if isinstance(x, str):
            parts.extend(p.strip() for p in x.split(","))
        else:
            parts.append(x)
    try:
        return tuple(item(x) for x in parts if not (isinstance(x, str) and not x))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name or 'list'}={value!r}: not a list of {getattr(item, '__name__', item)} ({e})") \
            from None
