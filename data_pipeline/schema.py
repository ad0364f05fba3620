"""One schema per config section: a dataclass built from an ml_collections section (or a dict), field for field.

The configs in ``configs/`` are ml_collections ``ConfigDict`` s (overridable on the command line); the code
reads them through dataclasses. :func:`from_mapping` builds the dataclass from its section: every key must
be a field (an unknown one fails, naming the section and the field), a missing field takes the dataclass
default, which equals the section's default in ``configs/base.py`` (tests/test_config_schema.py checks it).
A dataclass may be a part of a section (``prefix``: ``model.lora_*`` is ``LoRAConfig``); :func:`section_fields`
gives the checked keys as a dict, for the fields a section sets on a dataclass built from elsewhere (the
``ModelConfig`` of a checkpoint's ``config.json``).

:func:`parse_list` is the one parser of list-valued fields: configs hold tuples
(``model.lora_targets = ("q_proj", "v_proj")``), and a comma string from the command line
(``--config.model.lora_targets=q_proj,v_proj``) or an older config means the same tuple.

This module has no dependency (the bottom layer: data_pipeline and iopo_jax both use it).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Type, TypeVar

T = TypeVar("T")


def section_dict(section: Any) -> dict:
    """A plain dict of a section: a ConfigDict (``to_dict``), a mapping, or None (empty)."""
    if section is None:
        return {}
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return dict(section)


def section_fields(cls: Type, section: Any, where: str = "", exclude: tuple = (), *, complete: bool = False,
                   prefix: str = "", overrides: Mapping[str, Any] = ()) -> dict:
    """The keys of ``section`` checked against the fields of the dataclass ``cls``: ``{field: value}``.

    An unknown key raises ``ValueError`` naming ``config.<where>`` (``where`` itself when it already starts
    with ``config.`` or is not a section name, e.g. a file), the keys and the valid fields; a key also set in
    ``overrides`` raises; a missing key is left out (the dataclass default), or raises when ``complete`` (the
    section must then hold every field that ``overrides`` does not set, so the two cannot drift apart).
    ``exclude``: keys of the section that are not fields of ``cls`` and are dropped (e.g. settings of the
    caller or a nested section read by another dataclass). ``prefix``: only the keys that start with it are
    read, without it (a dataclass held by a part of a section: ``model.lora_rank``, ``model.lora_alpha``, ...
    are ``LoRAConfig.rank``, ``LoRAConfig.alpha``, ...)."""
    overrides = dict(overrides)
    values = {k[len(prefix):]: v for k, v in section_dict(section).items() if k not in exclude and k.startswith(prefix)}
    fields = {f.name for f in dataclasses.fields(cls)}
    problems = [(what, keys) for what, keys in (
        ("unknown fields", sorted(set(values) - fields)),
        ("missing fields", sorted(fields - set(values) - set(overrides)) if complete else []),
        ("set twice", sorted(set(values) & set(overrides)))) if keys]
    if problems:
        if not where:
            where = cls.__name__
        elif re.fullmatch(r"[A-Za-z_][\w.]*", where) and not where.startswith("config."):
            where = f"config.{where}"  # a section name; anything else (e.g. a file) is named as it is
        names = lambda keys: ", ".join(prefix + k for k in keys)  # noqa: E731  (as the section spells them)
        raise ValueError(f"{where}{'.' + prefix + '*' if prefix else ''} does not match {cls.__name__}: "
                         + "; ".join(f"{what}: {names(keys)}" for what, keys in problems)
                         + f" (the fields of {cls.__name__} are {names(sorted(fields))})")
    return values


def from_mapping(cls: Type[T], section: Any, where: str = "", exclude: tuple = (), *, complete: bool = False,
                 prefix: str = "", **overrides: Any) -> T:
    """``cls(**section, **overrides)``, the keys of the section checked by :func:`section_fields` (unknown,
    missing when ``complete``, set twice: ``ValueError`` naming the section and the keys). An instance of
    ``cls`` is returned as it is."""
    if isinstance(section, cls):
        return section
    return cls(**section_fields(cls, section, where, exclude, complete=complete, prefix=prefix, overrides=overrides),
               **overrides)


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
