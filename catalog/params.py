"""Typed, validated settings: one frozen dataclass per ``params.yaml`` block.

A block's class is the only place its defaults live. :func:`load` checks a raw YAML value
against the class: an unknown (misspelled) key, a wrong type or an out-of-range value raises
:class:`ParamsError` naming the file, the dotted key, what was found and what is allowed.

Fields are declared with :func:`param`::

    @dataclass(frozen=True)
    class OutliersParams:
        k: int = param(10, "neighbours per image", min=1)

Supported field types: ``bool``, ``int``, ``float`` (an int is accepted), ``str``,
``X | None``, ``Literal[...]``, ``list[X]``, ``dict[str, X]`` and nested frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from medlake.catalog.errors import WorkspaceError


class ParamsError(WorkspaceError):
    """A params block (or a recipe's settings) does not match its declared class."""


def param(default: Any = MISSING, help: str = "", *, min: float | None = None,
          max: float | None = None, factory: Any = MISSING, cli: bool = True) -> Any:
    """A field with a default, a help text and an optional range.

    Parameters
    ----------
    default, factory
        The default (``factory`` for lists and dicts).
    help
        One line for ``params.yaml`` comments, ``--help`` and the docs.
    min, max
        Inclusive bounds for numbers (and for the items of a list of numbers).
    cli
        Whether the stage's command gets a ``--name`` option overriding it.
    """
    meta = {"help": help, "min": min, "max": max, "cli": cli}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of text to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _range_text(meta: dict[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f" between {lo} and {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _found(v: Any) -> str:
    return f"{v!r} ({'null' if v is None else type(v).__name__})"


def _convert(tp: Any, v: Any, where: str, file: str, meta: dict[str, Any]) -> Any:
    def bad() -> ParamsError:
        return ParamsError(f"{file}: {where}: found {_found(v)}; allowed: "
                           f"{_type_name(tp)}{_range_text(meta)}")

    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if v is None:
            if type(None) in args:
                return None
            raise bad()
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(a, v, where, file, meta)
            except ParamsError as e:
                errors.append(e)
        raise bad()
    if origin is Literal:
        if v in get_args(tp) and not (isinstance(v, bool) and not any(isinstance(a, bool)
                                                                       for a in get_args(tp))):
            return v
        raise bad()
    if origin is list:
        if not isinstance(v, list):
            raise bad()
        (item,) = get_args(tp)
        return [_convert(item, x, f"{where}[{i}]", file, meta) for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise bad()
        _, val = get_args(tp)
        return {str(k): _convert(val, x, f"{where}.{k}", file, meta) for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return load(tp, v, file=file, key=where)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise bad()
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad()
        out: Any = v
    elif tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        out = float(v)
    elif tp is str:
        if not isinstance(v, str):
            raise bad()
        return v
    elif tp is Any:
        return v
    else:  # pragma: no cover - a declaration error, not a user error
        raise TypeError(f"unsupported params type {tp!r} at {where}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and out < lo) or (hi is not None and out > hi) or math.isnan(out):
        raise bad()
    return out


def load(cls: type, raw: Any, *, file: str = "params.yaml", key: str = "") -> Any:
    """An instance of the frozen dataclass ``cls`` from the raw YAML value ``raw``.

    ``None`` (block absent) gives the defaults. Raises :class:`ParamsError` on an unknown key,
    a wrong type, an out-of-range value or a missing required key.

    Example
    -------
    >>> load(OutliersParams, {"k": 5}, file="params.yaml", key="outliers")  # doctest: +SKIP
    OutliersParams(k=5, ...)
    """
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{file}: {key or 'top level'}: found {_found(raw)}; allowed: "
                          f"{_type_name(cls)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        import difflib

        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamsError(f"{file}: {key + '.' if key else ''}{k}: unknown key{hint}; "
                          f"allowed keys: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        where = f"{key}.{name}" if key else name
        if name in raw:
            values[name] = _convert(hints[name], raw[name], where, file, dict(f.metadata))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ParamsError(f"{file}: {where}: required key is missing; allowed: "
                              f"{_type_name(hints[name])}")
    inst = cls(**values)
    check = getattr(inst, "check", None)
    if callable(check):
        problem = check()
        if problem:
            raise ParamsError(f"{file}: {key}: {problem}")
    return inst


def to_dict(inst: Any) -> Any:
    """Plain YAML/JSON-ready values of a params instance (nested dataclasses as mappings)."""
    if dataclasses.is_dataclass(inst) and not isinstance(inst, type):
        return {f.name: to_dict(getattr(inst, f.name)) for f in dataclasses.fields(inst)}
    if isinstance(inst, (list, tuple)):
        return [to_dict(x) for x in inst]
    if isinstance(inst, dict):
        return {k: to_dict(v) for k, v in inst.items()}
    return inst


def defaults(cls: type) -> Any:
    """The defaults of ``cls`` as plain values."""
    return to_dict(cls())


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type text, default, help)`` for each field (docs and ``--help``)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not MISSING else
                   f.default_factory() if f.default_factory is not MISSING else None)
        out.append((f.name, _type_name(hints[f.name]) + _range_text(dict(f.metadata)),
                    to_dict(default), f.metadata.get("help", "")))
    return out


def scalar_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Fields whose type is a scalar (bool, int, float, str, Literal, or those or None)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (
            typing.Union, types.UnionType) else [tp]
        if len(args) == 1 and (args[0] in (bool, int, float, str) or get_origin(args[0]) is Literal):
            out.append((f, args[0]))
    return out


def replace(inst: Any, overrides: dict[str, Any], *, file: str = "command line",
            key: str = "") -> Any:
    """``inst`` with ``overrides`` applied, validated like a params file."""
    if not overrides:
        return inst
    return load(type(inst), {**to_dict(inst), **overrides}, file=file, key=key)


__all__ = ["ParamsError", "dataclass", "defaults", "describe", "load", "param", "replace",
           "scalar_fields", "to_dict"]
