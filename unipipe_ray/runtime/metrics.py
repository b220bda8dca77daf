"""A run's figures as Ray metrics, for the Ray dashboard's Metrics view, Grafana and any Prometheus scrape.

Every figure a stage reports (loss, learning rate, tokens/s, peak memory, PPO's rewards, KL, the watch's z
statistics and verdict, phase times, the engine-vs-trainer log-prob check, DPO and SamS figures) becomes a
gauge named ``unipipe_<key>`` (``sft/loss`` -> ``unipipe_sft_loss``), tagged with the run (its output
directory), the stage and the reporting rank, plus ``unipipe_step``. Ray's metrics agent on each node serves
them at the node's metrics export port in Prometheus' text format, with Ray's ``ray_`` prefix
(``ray_unipipe_sft_loss``) and Ray's own tags (node, session), a few seconds after they are set; the rank-0
worker of a Ray Train stage and PPO's controller (the driver) report them.

Off with ``UNIPIPE_RAY_METRICS=0``; outside Ray (a plain script) nothing is exported.
"""

from __future__ import annotations

import logging
import math
import os
import re

log = logging.getLogger(__name__)

PREFIX = "unipipe_"
TAG_KEYS = ("run", "stage", "rank")
_gauges: dict[str, object] = {}
_failed = False


def metric_name(key: str) -> str:
    """``sft/eval_loss`` -> ``unipipe_sft_eval_loss``: Prometheus names allow [a-zA-Z0-9_:] only."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_")


def exportable(metrics: dict) -> dict[str, float]:
    """The figures a gauge can carry: finite numbers (bools as 0/1), by metric name."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[metric_name(key)] = float(value)
    return out


def enabled() -> bool:
    if os.environ.get("UNIPIPE_RAY_METRICS", "1") == "0" or _failed:
        return False
    import ray

    return ray.is_initialized()


def export(metrics: dict, run: str, stage: str, rank: int = 0) -> None:
    """Set one gauge per figure. Never fails a stage: a metrics problem is logged once and turns export off."""
    global _failed
    if not enabled():
        return
    try:
        from ray.util.metrics import Gauge

        tags = {"run": run, "stage": stage, "rank": str(rank)}
        for name, value in exportable(metrics).items():
            gauge = _gauges.get(name)
            if gauge is None:
                gauge = _gauges[name] = Gauge(name, description=f"unipipe_ray figure {name[len(PREFIX):]}",
                                              tag_keys=TAG_KEYS)
            gauge.set(value, tags=tags)
    except Exception as e:  # noqa: BLE001 - monitoring must not stop training
        _failed = True
        log.warning("exporting metrics to Ray failed (%s); training goes on without them", e)
