"""One look for every ``cmgnet`` command line: ``usage: cmgnet <cmd>``, examples, useful defaults.

Light on purpose (standard library only): parsers are built and ``--help`` answered before
torch, transformers, Accelerate or MLflow are imported.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any


def _shown(value: Any) -> str:
    """A default as a user would type it: ``1 2 4`` for sequences, ``''`` for an empty string."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return repr(value) if value == "" else str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose, keeps indented lines (examples) as written; appends ``(default: X)`` where it informs.

    No default is shown for flags, for ``None`` (the help says what happens instead), or where
    the help text already talks about its default.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines[1:]) or (lines and lines[0].endswith(":")):
                paragraphs.append("\n".join(indent + line for line in lines))  # a list or examples: as written
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool) or action.nargs == 0
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})"


def examples_epilog(examples: Sequence[str]) -> str:
    """The ``examples:`` block that ends every ``--help``."""
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


def make_parser(prog: str, description: str, examples: Sequence[str], **kwargs: Any) -> argparse.ArgumentParser:
    """An :class:`argparse.ArgumentParser` in the house style.

    Args:
        prog: the command as typed, e.g. ``"cmgnet train"`` (shown as ``usage: cmgnet train ...``).
        description: one or a few sentences on what the command does.
        examples: command lines shown under ``examples:`` at the end of ``--help``.
        **kwargs: passed to :class:`argparse.ArgumentParser`.

    Returns:
        The parser.
    """
    return argparse.ArgumentParser(prog=prog, description=description, epilog=examples_epilog(examples),
                                   formatter_class=HelpFormatter, **kwargs)


def add_out_argument(parser: argparse.ArgumentParser | Any, help: str, **kwargs: Any) -> argparse.Action:
    """The one output flag: ``--out`` (``--output`` kept as an alias), stored as ``args.out``."""
    return parser.add_argument("--out", "--output", dest="out", metavar="DIR", help=help, **kwargs)
