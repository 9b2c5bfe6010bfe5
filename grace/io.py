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


# A directory a grace command created for itself holds this file, naming the command ("grace demo",
# "grace export"); a later run of that command may reuse or replace it, nothing else of the user's is touched.
OWNER_FILE = ".grace-owner"


def owner_of(path: str) -> str | None:
    """The command named in ``path``'s :data:`OWNER_FILE` (the grace command that created the directory), or
    None when the directory has none."""
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def mark_owner(path: str, owner: str) -> None:
    """Record in directory ``path`` that ``owner`` (a command, e.g. "grace export") created it."""
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(owner + "\n")


def claim_dir(path: str, owner: str, *, flag: str) -> None:
    """Make ``path`` a directory that ``owner`` may fill and later reuse: create it (and its :data:`OWNER_FILE`)
    when it is missing or empty; accept it when its OWNER_FILE names ``owner``.

    Raises:
        GraceError: ``path`` is not a directory, or is a non-empty directory that ``owner`` did not create (the
            message names ``flag``, the option that chose the path, and a few of the entries found there).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise GraceError(f"{flag} {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        found = owner_of(path)
        if found == owner:
            return
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        by = f"it was created by {found}" if found else f"it has no {OWNER_FILE} naming {owner}"
        raise GraceError(f"{flag} {path} holds files {owner} did not create ({shown}; {by}): choose a new or "
                         f"empty {flag}")
    os.makedirs(path, exist_ok=True)
    mark_owner(path, owner)


def path_relation(path: str, other: str) -> str | None:
    """Where ``path`` lies relative to ``other``, links resolved: "is" (the same file or directory), "inside"
    (under ``other``), "holds" (``other`` is under ``path``), or None (apart)."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "holds"
    return None
