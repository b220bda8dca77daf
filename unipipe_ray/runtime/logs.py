"""What a run writes for its user: diagnostics through ``logging`` in one format, and progress lines.

Diagnostics (a warning, a failed push, a suspected reward hack) go to module loggers under ``unipipe_ray``;
the command line installs one stderr handler in ``FORMAT`` (``setup_logging``). Progress lines (``stage 2/4
rm: run``, a step's metrics, a push) are the message alone on stdout, visible by default, through the
``unipipe_ray.progress`` logger: silence them with ``logging.getLogger("unipipe_ray.progress").setLevel(
logging.WARNING)`` or route them with a handler of your own. Results a command prints (its summary, the
report's path) are that command's output and stay ``print``.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(name)s: %(message)s"
PROGRESS = "unipipe_ray.progress"


def setup_logging(level: int = logging.INFO) -> None:
    """The command line's logging: one stderr handler on the root logger in FORMAT (a no-op when the root
    logger has handlers already, as under pytest), and Ray Train's per-report INFO lines off."""
    logging.basicConfig(level=level, format=FORMAT)
    quiet_ray_train_logs()


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report() call at INFO; our rank-0 progress line already says it."""
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when the line comes (pytest's capture, a Ray worker's stream), and
    writes it directly: Ray Train patches print() into a logger that would echo it twice."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _progress_logger() -> logging.Logger:
    logger = logging.getLogger(PROGRESS)
    if not logger.handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # shown once, as it is, whatever the root logger does
    return logger


_PROGRESS = _progress_logger()


def progress(message: str) -> None:
    """One progress line on stdout (see the module docstring)."""
    _PROGRESS.info(message)
