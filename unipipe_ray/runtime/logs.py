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
    """Ray Train logs every report() call at INFO (``Reporting training result N: TrainingReport(...)``, the
    whole metrics dict); our rank-0 progress line already says it. Its logger is named by the module's file
    path (``logging.getLogger(__file__)``), not its dotted name."""
    import importlib

    try:
        context = importlib.import_module("ray.train.v2._internal.execution.context")
    except ImportError:  # another Ray layout: its lines stay
        return
    for name in (context.__name__, context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def main_metric(metrics: dict) -> tuple[str, float] | None:
    """The figure a progress line leads with: the training loss, else any loss or accuracy."""
    for suffix in ("/loss", "loss", "accuracy"):
        for key, value in metrics.items():
            if key.endswith(suffix) and "eval" not in key and isinstance(value, int | float):
                return key.split("/")[-1], float(value)
    return None


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLines:
    """The driver's progress bar as lines, for a log with no terminal (``ray job logs``, CI): at most one line
    every ``every_s`` seconds, and the last step always, each with the step, the percentage, an ETA from the
    steps seen so far (a resumed run counts from where it resumed) and the main metric."""

    def __init__(self, stage: str, every_s: float = 10.0, clock=None):
        import time

        self.stage, self.every_s, self.clock = stage, every_s, clock or time.monotonic
        self.first: tuple[int, float] | None = None
        self.last_step, self.last_time = -1, float("-inf")

    def line(self, step: int, total: int, metrics: dict) -> str | None:
        now = self.clock()
        if not total:  # the workers have not reported yet
            return None
        if self.first is None:
            self.first = (step, now)
        if step == self.last_step or (now - self.last_time < self.every_s and step < total):
            return None
        self.last_step, self.last_time = step, now
        parts = [f"{self.stage}: step {step}/{total} ({100 * step / total:.0f}%)"]
        done, since = step - self.first[0], now - self.first[1]
        if step < total and done > 0 and since > 0:
            parts.append(f"eta {duration(since / done * (total - step))}")
        shown = main_metric(metrics)
        if shown:
            parts.append(f"{shown[0]} {shown[1]:.4g}")
        return ", ".join(parts)
