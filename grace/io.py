"""Small file and error helpers every module shares: the one atomic write, the one JSON reader, the one way
an exception becomes a line of a message.

Atomic writes go to ``<path>.tmp-<pid>`` and are renamed into place, so a reader never sees half a file and
a crash leaves the previous file intact; ``grace.train`` removes the temp files of dead processes at the
next start, which is why the pid is in the name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

from grace.errors import GraceError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path`` to write to; renamed to ``path`` when the block ends normally,
    removed when it raises (the exception propagates).

    Usage: ``with atomic_path(p) as tmp: torch.save(obj, tmp)``.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(obj, path: str, *, indent: int | None = 1, **dump_kwargs) -> None:
    """``json.dump(obj)`` into ``path`` atomically (:func:`atomic_path`); ``dump_kwargs`` go to json.dump."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, **dump_kwargs)


def read_json(path: str, *, what: str = "", hint: str = "") -> dict:
    """The JSON object in ``path``.

    ``what`` says what the file is ("the run's configuration"), ``hint`` what to do about a bad one; both go
    into the message when given.

    Raises:
        GraceError (a ValueError): the file is missing, not UTF-8, not valid JSON, or holds something other
            than a JSON object; the message names ``path``.
    """
    name = f"{path} ({what})" if what else path
    tail = f"; {hint}" if hint else ""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise GraceError(f"{name} not found{tail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraceError(f"{name} is not valid JSON ({one_line(e, first=True, typed=True)}){tail}") from None
    if not isinstance(data, dict):
        raise GraceError(f"{name} must hold a JSON object, found {type(data).__name__}{tail}")
    return data


def one_line(error: BaseException, *, first: bool = False, typed: bool = False) -> str:
    """The error's message on one line: its non-empty lines joined with "; ", or only the first with
    ``first`` (a parser's message can run long); prefixed by the exception's type name with ``typed``. An
    error without a message gives its type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if first and lines else "; ".join(lines)
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if typed else text
