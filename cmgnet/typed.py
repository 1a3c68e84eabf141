"""Dataclass records from plain trees (YAML, JSON, ``key=value`` overrides), typed by pydantic.

Every config and record of the project is a plain ``@dataclass`` that the code reads as
attributes. :func:`build` makes one from a nested mapping: unknown keys are refused naming
the dotted key and the valid ones, and each value is validated against its field's type by
pydantic v2 (``TypeAdapter``: YAML's ``1`` for a float, a list for a tuple, ``Literal``
choices, unions), so ``optim.betas=[0.9, 2, 3]`` or ``train.epochs=abc`` stops at load with
the key in the message. Nested dataclass fields, and lists of them (``data.sources``), are
built the same way, so an optional ``check(key, value)`` (the experiment config's ranges)
sees every value under its dotted key before any ``__post_init__`` runs.

The dataclasses stay free of pydantic: validation is applied to them, not declared in them.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cmgnet.errors import shorten, shown

Check = Callable[[str, Any], None]


def build(cls: type, values: Mapping[str, Any], prefix: str = "", check: Check | None = None) -> Any:
    """Dataclass ``cls`` from a (nested) mapping, every key and value checked.

    Args:
        cls: a dataclass type.
        values: field values; a nested dataclass field takes a mapping (or an instance).
        prefix: dotted path of ``cls`` in its tree, for messages (``data``, ``data.sources[1]``).
        check: called as ``check(dotted_key, value)`` with each validated value before
            ``cls(...)`` runs (range checks that must name the key).

    Returns:
        An instance of ``cls``; fields not given keep their defaults.

    Raises:
        KeyError: an unknown key (the message lists the valid ones).
        TypeError: a value of the wrong kind (``a number``, ``a mapping``, ...).
        ValueError: a value of the right kind that the type refuses (a ``Literal`` choice,
            a tuple's length, a non-finite float).
    """
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        keys = ", ".join(shorten(_join(prefix, str(u))) for u in unknown[:10])
        more = " ..." if len(unknown) > 10 else ""
        where = f" in {prefix}" if prefix else ""
        raise KeyError(f"unknown key(s) {keys}{more}{where}; valid: {', '.join(names)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = _join(prefix, name)
        kwargs[name] = typed_value(value, hints[name], key, check)
        if check is not None:
            check(key, kwargs[name])
    return cls(**kwargs)


def typed_value(value: Any, hint: Any, key: str, check: Check | None = None) -> Any:
    """``value`` as type ``hint`` (see :func:`build`); ``key`` names it in errors."""
    if hint is Any:
        return value
    item = _dataclass_of(hint)
    if item is not None:
        if dataclasses.is_dataclass(value) or (value is None and item is not hint):  # an instance, or X | None
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}: expected a mapping of {item.__name__} fields, got {shown(value)}")
        return build(item, value, key, check)
    sequence = _sequence_of(hint)
    if sequence is not None and value is not None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            value = [value]  # `key=x` on the command line for a one-element list
        item = _dataclass_of(typing.get_args(sequence)[0]) if typing.get_args(sequence) else None
        if item is not None:  # e.g. data.sources: each item built (and checked) under its index
            return [typed_value(v, item, f"{key}[{i}]", check) for i, v in enumerate(value)]
    try:
        return _adapter(hint).validate_python(value)
    except _validation_error() as err:
        raise _as_builtin(err, key, hint, value) from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a hint names (``X`` or ``X | None``), else ``None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _sequence_of(hint: Any) -> Any:
    """The list or tuple type a hint names (``list[X]`` or ``list[X] | None``), else ``None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if typing.get_origin(hint) in (list, tuple, Sequence) else None


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    # Lax mode reads YAML/JSON scalars as the field's type ("1e-3" and 1 as floats, a list as a
    # tuple) and numbers may name strings (a run called 2024), but booleans and integers are
    # exact (_exact); nan and inf train to NaN weights.
    return TypeAdapter(_exact(hint), config=ConfigDict(coerce_numbers_to_str=True, allow_inf_nan=False))


def _exact(hint: Any) -> Any:
    """``hint`` with booleans and integers strict: ``true`` is not the number 1, ``"no"`` or 1 not a
    boolean, 2.5 not an integer (lax pydantic would read ``modality_dropout: true`` as 1.0)."""
    from pydantic import BeforeValidator, Strict

    if hint is bool or hint is int:
        return typing.Annotated[hint, Strict()]
    if hint is float:
        return typing.Annotated[float, BeforeValidator(_not_bool)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_exact(a) for a in args)]
    if origin in (list, tuple, Sequence) and args:
        return origin[tuple(a if a is Ellipsis else _exact(a) for a in args)]
    return hint


def _not_bool(value: Any) -> Any:
    from pydantic_core import PydanticCustomError

    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not true/false")
    return value


def _validation_error() -> type[Exception]:
    from pydantic import ValidationError

    return ValidationError


_VALUE_ERRORS = {"literal_error", "enum", "finite_number", "too_long", "too_short", "value_error",
                 "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}


def _as_builtin(err: Any, key: str, hint: Any, value: Any) -> Exception:
    """pydantic's first error as a ``TypeError``/``ValueError`` naming the dotted key (items as ``key[i]``)."""
    first = err.errors(include_url=False)[0]
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    if args and Ellipsis not in args and first["type"] in ("missing", "too_short", "too_long") \
            and isinstance(value, Sequence) and len(value) != len(args):
        return ValueError(f"{key}: expected {len(args)} values, got {shown(value)}")
    # Leaf types hold no dataclasses (build recurses into those): a location's ints are item
    # indices, its strings pydantic's names of union members, which the key makes redundant.
    where = key + "".join(f"[{part}]" for part in first["loc"] if isinstance(part, int))
    if first["type"] == "finite_number":  # the input may be the text "nan": show the number
        return ValueError(f"{where}={float(first['input'])}: must be a finite number")
    message = first["msg"][:1].lower() + first["msg"][1:]
    kind = ValueError if first["type"] in _VALUE_ERRORS else TypeError
    return kind(f"{where}: {message}, got {shown(first['input'])}")


def to_plain(value: Any) -> Any:
    """A record or config as plain YAML/JSON values (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
