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
