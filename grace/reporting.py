"""Where ``grace train`` reports each optimizer step's row: the one logging call site of the loop.

A logger is any object with ``log(row: dict) -> None`` and ``close() -> None``; ``row`` is the dict
:func:`grace.train.train_step` returns (``step``, the losses, ``beta``, ``lr``, ``tokens``, ...). Only rank 0
logs. metrics.jsonl (:class:`JSONLLogger`) is always written: resume reads it back. ``TrainConfig.report_to``
(``--report-to tensorboard``, the name Hugging Face trainers use) adds the loggers of :data:`REPORTERS`.
"""

from __future__ import annotations

import json
import os


class JSONLLogger:
    """Appends one JSON line per step to ``path`` (flushed at once: a crash loses at most the line being
    written, which :func:`grace.rundir.read_metrics` drops)."""

    def __init__(self, path: str):
        self.path = path

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Writes every numeric entry of a row as a scalar at global step ``row["step"]`` under ``log_dir``.
    ``first_step``: the step the run continues after (resume); events a crashed process logged after it are
    purged, so the curves match metrics.jsonl.

    Raises:
        GraceError: tensorboard is not installed (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str, first_step: int = 0):
        SummaryWriter = self.writer_class()
        self.writer = SummaryWriter(log_dir, purge_step=first_step + 1 if first_step else None)

    @staticmethod
    def writer_class():
        """torch's SummaryWriter. Raises GraceError when tensorboard is not installed."""
        from grace.errors import GraceError

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GraceError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or leave --report-to unset to log to metrics.jsonl only)") from None
        return SummaryWriter

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# name -> (factory(run directory, step the run continues after), check that raises when it cannot work)
REPORTERS = {"tensorboard": (lambda out, step: TensorBoardLogger(os.path.join(out, "tensorboard"), step),
                             TensorBoardLogger.writer_class)}


def parse_report_to(value: str | None, *, check: bool = False) -> list[str]:
    """The reporter names of ``TrainConfig.report_to`` (comma-separated; None or "": none beyond metrics.jsonl).
    With ``check``, also that each one can work here (its package is installed).

    Raises:
        ValueError: a name not in :data:`REPORTERS`; with ``check``, GraceError (a ValueError) for a logger
            whose package is missing.
    """
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown logger {', '.join(unknown)}; choose from {', '.join(REPORTERS)}")
    if check:
        for name in names:
            REPORTERS[name][1]()
    return names


def make_loggers(out: str, report_to: str | None, first_step: int) -> list:
    """metrics.jsonl in run directory ``out``, then the loggers ``report_to`` names."""
    return [JSONLLogger(os.path.join(out, "metrics.jsonl"))] + [
        REPORTERS[name][0](out, first_step) for name in parse_report_to(report_to)]
