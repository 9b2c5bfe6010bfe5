"""What the command-line tests check alike: a refused command's one-line error, and files left as they were.
(Imported by name: pytest puts this directory on sys.path for the test modules in it.)"""

from __future__ import annotations

import os


def assert_one_line_error(returncode: int, stderr: str, *fragments: str, command: str | None = None) -> str:
    """Exit 2, no traceback, the error on one line of stderr holding every fragment; returns the line.

    Without ``command`` stderr must hold that line alone (transformers' "Loading weights" bars may precede it);
    with it, other output (the trainer's log) may surround the one ``grace <command>: error:`` line."""
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]
    if command is not None:
        lines = [line for line in lines if line.startswith(f"grace {command}: error:")]
    assert len(lines) == 1 and lines[0].startswith("grace "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(root) -> dict:
    """Every file under ``root`` (relative path) with its bytes and modification time: what a refused command
    must leave as it was."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out
