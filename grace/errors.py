"""The project's error class for failures a user can fix.

Library functions raise ``ValueError``/``TypeError`` naming the argument for bad arguments. A
:class:`GraceError` is for the rest of what a user can fix: a file that cannot be read (named in the
message), a run directory that would be overwritten, settings that disagree with a checkpoint. It
subclasses ValueError, so ``except ValueError`` callers keep working. The ``grace`` CLI prints any of
these as one line on stderr and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations


class GraceError(ValueError):
    """An expected failure, stated in one line that names the file or option and what to do."""


class NonFiniteLossError(GraceError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message says whether a checkpoint is left to resume."""


class TrainingStopped(SystemExit):
    """Training stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint. A SystemExit whose code is
    128 + the signal's number, the shell's convention for a death by that signal, so the ``grace`` command
    exits with it without a traceback; ``signum`` and ``step`` say which signal and where it stopped."""

    def __init__(self, signum: int, step: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.message = signum, step, message

    def __str__(self) -> str:
        return self.message
