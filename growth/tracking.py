"""Experiment trackers: the numbers of epochs.csv and metrics.json, also sent to TensorBoard,
MLflow or Weights & Biases (config `tracking:`).

One protocol, `Tracker` (params once, scalars at a step, files at the end, close), and one
fan-out, `Tracking`, which names the numbers the same way for every tracker:

  train_loss/task_T, val_accuracy/task_T   every epoch; step T * epochs + epoch
  accuracy/task_J                          after task T, the R row R[T+1][J] for every task J
  average_accuracy                         the mean of R[T+1][0..T]
  acc, bwt, fwt                            ACC/BWT/FWT of the finished tasks (where defined)
  size/KEY                                 the sizes entry after task T (params, relative, ...)

The numbers after task T are logged at step (T + 1) * epochs - 1, the task's last epoch. The
config is logged as params (dotted keys; W&B: nested, the run's config). When a run
finishes, MLflow and W&B receive its files (config.yaml, metrics.json, metrics.csv,
epochs.csv, log.txt and report/) as artifacts.

A resume continues the same tracked run: TensorBoard drops the events at or after the step it
starts from; MLflow's run id is kept in RUNDIR/tracking.json; W&B's run id is the run's own
(run.json). MLflow and W&B keep the values an interrupted task logged before the crash
(their history is append-only); the resumed epochs log again at the same steps.

Tracking never stops a run: a tracker that fails while logging is reported in the log and
dropped; one that cannot start is a ConfigError before anything is trained.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from growth.errors import ConfigError
from growth.io import atomic_write_text

log = logging.getLogger("growth.tracking")
TENSORBOARD = "tensorboard"  # RUNDIR/tensorboard: the event files
STATE = "tracking.json"  # RUNDIR/tracking.json: ids of the tracked runs, for resume
RUN_FILES = ("config.yaml", "metrics.json", "metrics.csv", "epochs.csv", "log.txt")
REPORT = "report"
MAX_PARAM_CHARS = 500  # MLflow's smallest limit on a param's value across its versions


class Tracker(Protocol):
    """One experiment tracker's side of a run."""

    def params(self, config: dict[str, Any]) -> None:
        """The run's settings (the resolved config, nested) at its start."""

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Scalars at one step."""

    def artifacts(self, root: Path, files: list[Path]) -> None:
        """Files of the run (paths under root; folders whole), when it finishes."""

    def close(self, ok: bool) -> None:
        """End the tracked run: finished (ok) or interrupted."""


# ---- the fan-out -------------------------------------------------------------------------------
class Tracking:
    """A campaign's events as named scalars, sent to every tracker switched on."""

    def __init__(self, trackers: dict[str, Tracker], epochs_per_task: int) -> None:
        self.trackers = dict(trackers)
        self.epochs = max(1, epochs_per_task)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def params(self, config: dict[str, Any]) -> None:
        config = {k: v for k, v in config.items() if k != "tracking"}
        self._each("params", lambda t: t.params(config))

    def epoch(self, task: int, epoch: int, loss: float, val: float) -> None:
        values = {f"train_loss/task_{task}": float(loss)}
        if not math.isnan(val):
            values[f"val_accuracy/task_{task}"] = float(val)
        self.log(values, task * self.epochs + epoch)

    def task_done(self, task: int, metrics: dict[str, Any]) -> None:
        """The R row after `task`, its average over the tasks seen, ACC/BWT/FWT and sizes."""
        row = metrics["R"][task + 1]
        values = {f"accuracy/task_{j}": float(v) for j, v in enumerate(row) if _number(v)}
        seen = [v for v in row[: task + 1] if _number(v)]
        if seen:
            values["average_accuracy"] = sum(seen) / len(seen)
        values.update({k: float(metrics[k]) for k in ("acc", "bwt", "fwt")
                       if _number(metrics.get(k))})
        sizes = metrics["sizes"][-1] if metrics.get("sizes") else {}
        values.update({f"size/{k}": float(v) for k, v in sizes.items()
                       if k != "task" and _number(v)})
        self.log(values, (task + 1) * self.epochs - 1)

    def log(self, values: dict[str, float], step: int) -> None:
        self._each("metrics", lambda t: t.metrics(values, step))

    def finish(self, run_dir: Path, names: Iterable[str] = (*RUN_FILES, REPORT)) -> None:
        """Hand the run's files to the trackers (those present of `names`)."""
        files = [run_dir / n for n in names if (run_dir / n).exists()]
        self._each("artifacts", lambda t: t.artifacts(run_dir, files))

    def close(self, ok: bool = True) -> None:
        self._each("close", lambda t: t.close(ok))
        self.trackers.clear()

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 (tracking never stops a run)
                log.warning("tracking: %s failed at %s (%s: %s); it is switched off for the "
                            "rest of the run", name, what, type(exc).__name__, exc)
                self.trackers.pop(name, None)


def open_tracking(settings: Any, run_dir: Path, run_id: str, name: str,
                  epochs_per_task: int, start_step: int = 0) -> Tracking:
    """The trackers `settings` (a config's TrackingConfig) switch on, for one run or resume;
    `start_step` is where this process starts logging (a resume's first epoch)."""
    run_dir = Path(run_dir)
    trackers: dict[str, Tracker] = {}
    try:
        if settings.tensorboard:
            trackers["tensorboard"] = TensorBoardTracker(run_dir / TENSORBOARD, start_step)
        if settings.mlflow is not None:
            trackers["mlflow"] = MLflowTracker(settings.mlflow, run_dir, name)
        if settings.wandb is not None:
            trackers["wandb"] = WandbTracker(settings.wandb, run_dir, run_id, name)
    except BaseException:
        Tracking(trackers, epochs_per_task).close(ok=False)
        raise
    return Tracking(trackers, epochs_per_task)


# ---- TensorBoard -------------------------------------------------------------------------------
class TensorBoardTracker:
    """Event files through torch's SummaryWriter; the config as a text entry."""

    def __init__(self, folder: Path, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        # purge_step drops events a killed run wrote at or after the step this run starts from
        self.writer = SummaryWriter(str(folder), purge_step=start_step or None)

    def params(self, config: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in flatten(config).items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def artifacts(self, root: Path, files: list[Path]) -> None:
        """The event files sit in the run directory with the rest."""

    def close(self, ok: bool) -> None:
        self.writer.close()


# ---- MLflow ------------------------------------------------------------------------------------
class MLflowTracker:
    """One MLflow run per campaign, through MlflowClient (no process-wide active run, so
    several campaigns in one process do not mix)."""

    def __init__(self, settings: Any, run_dir: Path, name: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self.state = run_dir / STATE
        allow_file_store(settings.uri)
        try:
            self.client = MlflowClient(tracking_uri=settings.uri)
            self.run_id = self._continue() or self._create(settings, name)
        except Exception as exc:  # noqa: BLE001 (a store that cannot be reached or written)
            raise ConfigError(f"tracking.mlflow: cannot start an MLflow run at "
                              f"{settings.uri or 'the default tracking URI'} ({exc}); check "
                              "tracking.mlflow.uri") from None

    def _continue(self) -> str | None:
        """The run a previous process of this run directory started, if the store has it."""
        run_id = _read_state(self.state).get("mlflow")
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 (another store, or the run was deleted)
            log.warning("tracking: MLflow run %s is not in this store; starting a new one",
                        run_id)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, settings: Any, name: str) -> str:
        found = self.client.get_experiment_by_name(settings.experiment)
        exp = found.experiment_id if found is not None else \
            self.client.create_experiment(settings.experiment)
        run = self.client.create_run(exp, run_name=settings.run_name or name,
                                     tags=dict(settings.tags))
        _write_state(self.state, "mlflow", run.info.run_id)
        return run.info.run_id

    def params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        have = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in have]  # params cannot be rewritten
        for i in range(0, len(items), 100):  # MLflow takes up to 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, step) for k, v in values.items()])

    def artifacts(self, root: Path, files: list[Path]) -> None:
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


# ---- Weights & Biases --------------------------------------------------------------------------
class WandbTracker:
    """One W&B run per campaign, its id the run directory's run id (so a resume continues it);
    our step is the x axis of every metric (define_metric), so a resume may log again at the
    steps of the task it learns again."""

    def __init__(self, settings: Any, run_dir: Path, run_id: str, name: str) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self.wandb = wandb
        if settings.mode == "online" and not wandb.login(prompt=False):
            raise ConfigError("tracking.wandb: mode online needs a W&B login (`wandb login`, or "
                              "WANDB_API_KEY); or set tracking.wandb.mode: offline and `wandb "
                              "sync` the run later")
        folder = Path(settings.dir or os.environ.get("WANDB_DIR") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=settings.project, entity=settings.entity, mode=settings.mode,
                dir=str(folder), id=run_id or None, resume="allow", name=name,
                group=settings.group, tags=list(settings.tags) or None, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # noqa: BLE001 (not logged in, no network, bad project)
            raise ConfigError(f"tracking.wandb: cannot start a W&B run ({exc}); log in with "
                              "`wandb login`, or set tracking.wandb.mode: offline") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def params(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def artifacts(self, root: Path, files: list[Path]) -> None:
        art = self.wandb.Artifact(f"run-{self.run.id}", type="growth-run")
        for path in files:
            if path.is_dir():
                art.add_dir(str(path), name=path.name)
            else:
                art.add_file(str(path), name=path.name)
        self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def allow_file_store(uri: str | None) -> None:
    """MLflow 3 refuses its file store unless asked (MLFLOW_ALLOW_FILE_STORE); a `file:` URI
    is that request."""
    if (uri or "").startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


# ---- helpers -----------------------------------------------------------------------------------
def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with string values (lists as JSON)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(data, (list, dict)):
        return {key: json.dumps(data)}
    return {key: "null" if data is None else str(data)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _missing(name: str) -> ConfigError:
    return ConfigError(f"tracking.{name} needs the {name} package: pip install "
                       f"'growth[{name}]' (or pip install {name})")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, key: str, value: str) -> None:
    atomic_write_text(path, json.dumps({**_read_state(path), key: value}, indent=1) + "\n")
