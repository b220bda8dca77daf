"""Runs in MLflow besides TensorBoard (``--mlflow URI`` on every command; the ``mlflow`` extra).

The driver does all the talking to MLflow: a stage's figures reach it through the progress actor (every
report line, launch.py) or, for PPO, from its controller in the driver's process, so the tracking URI only
has to work on the machine that submits the run: a local store (``sqlite:///mlflow.db``) or a server.
Ray Train workers and Tune trials never open a run (nothing is configured in their processes).

A pipeline is one MLflow run named after its run_dir, with a child run per stage (``<run>/<stage>``); a
stage alone is one run. Parameters: the stage's config, flattened to dotted keys. Artifacts: the stage's
config and result files, the pipeline's report and plots. A run that raises ends FAILED (KILLED on Ctrl-C).
Logging is best effort once a run is open: a failed call is logged as a warning and training goes on; an
unusable URI stops the command before any work (``check``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

_target: dict = {}                 # {"uri": ..., "experiment": ...} once configured
_open: list[tuple[str, str]] = []  # (run id, run name) of the runs open in this process, innermost last
_warned: set[str] = set()

MAX_PARAM_CHARS = 6000             # MLflow's limit on one parameter's value
PARAMS_PER_BATCH = 100             # and on parameters per log_batch call


def configure(uri: str | None, experiment: str = "unipipe") -> None:
    """Track this process's runs at ``uri`` (None: off), in the named experiment."""
    _target.clear()
    if uri:
        _target.update(uri=uri, experiment=experiment)


def add_arguments(parser) -> None:
    """``--mlflow`` and ``--mlflow-experiment`` on a command that trains (cli.py, tune/cli.py)."""
    parser.add_argument("--mlflow", metavar="URI", help="also track the run in MLflow at this tracking URI, e.g. "
                        "sqlite:///mlflow.db or http://host:5000 (needs the mlflow extra)")
    parser.add_argument("--mlflow-experiment", default="unipipe", metavar="NAME",
                        help="the MLflow experiment the runs go to (default: unipipe)")


def enabled() -> bool:
    return bool(_target)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, values as text cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return out


def metric_values(metrics: dict) -> dict[str, float]:
    """The figures MLflow can plot: finite numbers, flags as 0/1 (the step is MLflow's own axis)."""
    out = {}
    for key, value in metrics.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def run_name(stage: str, output_dir: str) -> str:
    """``<pipeline run>/<stage>`` inside a pipeline's run; else ``<output_dir's name>/<stage>`` (or the stage)."""
    if _open:
        return f"{_open[-1][1]}/{stage}"
    name = Path(str(output_dir).rstrip("/")).name
    return stage if name in ("", stage) else f"{name}/{stage}"


def _client():
    if _target.get("client") is None:  # one client per URI: a SQL store opens its database once
        from mlflow import MlflowClient

        _target["client"] = MlflowClient(_target["uri"])
    return _target["client"]


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (MLflow's default would be
    ./mlruns under whatever directory the command ran in); a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _experiment_id(client) -> str:
    found = client.get_experiment_by_name(_target["experiment"])
    if found:
        return found.experiment_id
    return client.create_experiment(_target["experiment"], artifact_location=artifact_location(_target["uri"]))


def check() -> None:
    """Stop now, with the reason, if MLflow is missing or the URI cannot hold runs (raises ValueError)."""
    if not enabled():
        return
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise ValueError("--mlflow needs MLflow: pip install 'unipipe-ray[mlflow]'") from e
    try:
        _experiment_id(_client())
    except Exception as e:
        raise ValueError(f"--mlflow {_target['uri']}: cannot use this tracking URI ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _best_effort(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # the tracker is for watching: its failure must not end the training it watches
        if what not in _warned:
            _warned.add(what)
            log.warning("MLflow: %s failed (%s: %s); training goes on (this is said once)", what,
                        type(e).__name__, e)
        return None


@contextlib.contextmanager
def tracked_run(name: str, params: dict | None = None, tags: dict | None = None):
    """An MLflow run for the block, a child of the one open around it; yields its id (None when off)."""
    if not enabled():
        yield None
        return
    client = _client()
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if _open:
        tags["mlflow.parentRunId"] = _open[-1][0]
    run = client.create_run(_experiment_id(client), run_name=name, tags=tags)
    run_id = run.info.run_id
    log.info("MLflow: run %s (%s) at %s", name, run_id, _target["uri"])
    items = sorted(flat_params(params or {}).items())
    from mlflow.entities import Param

    for i in range(0, len(items), PARAMS_PER_BATCH):
        _best_effort("logging parameters", client.log_batch, run_id,
                     params=[Param(k, v) for k, v in items[i:i + PARAMS_PER_BATCH]])
    _open.append((run_id, name))
    status = "FINISHED"
    try:
        yield run_id
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _open.pop()
        _best_effort("ending the run", client.set_terminated, run_id, status)


def log_metrics(step: int, metrics: dict) -> None:
    """The figures of one report line, at ``step``, in the innermost open run (no-op without one)."""
    values = metric_values(metrics)
    if not _open or not values:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _best_effort("logging metrics", _client().log_batch, _open[-1][0],
                 metrics=[Metric(k, v, now, int(step)) for k, v in values.items()])


def log_artifacts(*paths, under: str | None = None) -> None:
    """Files or directories (those that exist) as artifacts of the innermost open run."""
    if not _open:
        return
    client = _client()
    for path in map(Path, paths):
        if path.is_dir():
            _best_effort("uploading artifacts", client.log_artifacts, _open[-1][0], str(path),
                         f"{under}/{path.name}" if under else path.name)
        elif path.is_file():
            _best_effort("uploading artifacts", client.log_artifact, _open[-1][0], str(path), under)


def tune_callback(parent_id: str | None) -> list:
    """Ray Tune's MLflow logger for a sweep's trials, each a child run of the sweep's run (none when off):
    the trial's config as parameters, every result it reports as metrics."""
    if not parent_id:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(_target["uri"], experiment_name=_target["experiment"],
                                 tags={"mlflow.parentRunId": parent_id})]
