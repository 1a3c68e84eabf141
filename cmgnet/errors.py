"""Errors shared by every entry point, and the one wrapper that turns them into one line.

Every command (``cmgnet <sub-command>``, ``launch/*.py``, ``benchmarks/*.py``) runs through
:func:`cli_entry`: a bad dataset, config, checkpoint, bundle, ONNX file or text cache ends in
one ``error: <file>: <what is wrong>`` line on stderr and exit code 1 (2 for usage errors),
never in a traceback. ``--debug`` (anywhere in the arguments) or ``CMGNET_DEBUG=1`` lets the
exception through, traceback included.

The exception types here carry the offending file in their message; they subclass the
built-in types callers already catch (``ValueError``), so nothing that handled the old
errors breaks.
"""

from __future__ import annotations

import functools
import os
import reprlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CMGNET_DEBUG"


class CmgnetError(ValueError):
    """Bad input a user can fix; the message names the file (and key or row).

    Args:
        message: what is wrong and, where useful, how to fix it.
        path: the offending file or folder (prefixed to the message).
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class CheckpointError(CmgnetError):
    """A saved model, training checkpoint or text cache is missing, corrupt or inconsistent."""


class UsageError(CmgnetError):
    """The command line contradicts itself or the model (exit code 2)."""


class NonFiniteError(CmgnetError):
    """Training met a NaN or infinite loss or weights; nothing non-finite was applied or saved."""


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if lines else err.__class__.__name__


def one_line(err: BaseException, with_type: bool = False) -> str:
    """An exception as one line: its message (lines joined), the type for non-cmgnet errors.

    Args:
        err: the exception.
        with_type: name the type whatever the error (for reports that keep going past it).
    """
    text = _first_line(err)
    from_us = isinstance(err, CmgnetError) or err.__class__.__module__.startswith("cmgnet")
    if not with_type and (from_us or isinstance(err, (OSError, ValueError, KeyError, TypeError))):
        return text
    return f"{err.__class__.__name__}: {text}"


SHOWN_CHARS = 80
"""Longest value an error message echoes."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, SHOWN_CHARS, SHOWN_CHARS


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with ``...``.

    A config value may be huge (a megabyte string, a list of 100,000 items): an error must
    name it, never print all of it. :mod:`reprlib` keeps the work bounded too.
    """
    return shorten(_REPR.repr(value), limit)


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters with ``...`` (a key or name echoed in an error)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the arguments or ``CMGNET_DEBUG`` set to anything but ``0``/empty."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate ``main(argv, ...) -> exit code`` so any failure is one stderr line and an exit code.

    ``--debug`` is removed from ``argv`` before ``main`` sees it. ``SystemExit`` (argparse's
    usage errors: exit 2, ``--help``: 0) passes through unchanged.

    Args:
        main: the command; gets the argument list without the program name (and any further
            arguments the wrapper is called with, e.g. ``prog=``).

    Returns:
        ``wrapper(argv=None, ...) -> int`` (``argv=None`` reads ``sys.argv[1:]``).
    """

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None, *more: Any, **options: Any) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = debug_enabled(args)
        args = [a for a in args if a != DEBUG_FLAG]
        try:
            return int(main(args, *more, **options) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            print("error: interrupted", file=sys.stderr, flush=True)
            return 130
        except Exception as err:  # noqa: BLE001 - the point: no traceback reaches the user
            if debug:
                raise
            hint = "" if isinstance(err, CmgnetError) or _is_data_error(err) else f" (rerun with {DEBUG_FLAG} for the traceback)"
            print(f"error: {one_line(err)}{hint}", file=sys.stderr, flush=True)
            return 2 if isinstance(err, UsageError) else 1

    return wrapper


def _is_data_error(err: BaseException) -> bool:
    # cmgnet.data.errors is not imported here: this module must stay import-light.
    return err.__class__.__name__ == "DataError" or err.__class__.__module__.startswith("cmgnet.deploy")
