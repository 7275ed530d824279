"""Experiment trackers (training.report_to): TensorBoard, MLflow and Weights & Biases.

Each is an optional package, imported only when a recipe lists it. `Trackers` receives exactly the records the
loop writes to metrics.jsonl (and the run summary) and passes them to every tracker with the record's step, so
all of them show the same numbers. Only the main process opens trackers. Nothing phones home unless configured:
TensorBoard and MLflow write inside the run directory unless given a tracking URI, W&B runs offline unless told
otherwise. A tracker that fails is dropped with one warning line; training goes on without it. Each tracker's
run id is kept in the run directory, so `--resume` continues the same tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftcli.errors import PeftCliError
from peftcli.train.run_dir import MLFLOW_DIR, TENSORBOARD_DIR, TRACKERS_FILE
from peftcli.train.safe_write import write_text_atomic

# tracker -> (module it imports, the peftcli extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
_MLFLOW_PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter value
_MLFLOW_BATCH = 100  # parameters per log_batch call (MLflow's limit)


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers_installed(report_to: list[str]) -> None:
    """Refuse a recipe whose trackers are not installed, before anything loads."""
    missing = [name for name in report_to if not _installed(PACKAGES[name][0])]
    if missing:
        extras = ",".join(PACKAGES[name][1] for name in missing)
        raise PeftCliError(
            f"training.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            f"install with pip install 'peftcli[{extras}]' (or remove {'it' if len(missing) == 1 else 'them'} "
            "from training.report_to)"
        )


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: `train/loss`, `eval/loss`, `generation/score`..."""
    kind = record["type"]
    return {
        f"{kind}/{key.removeprefix(kind + '_')}": float(value)
        for key, value in record.items()
        if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def summary_scalars(summary: dict, prefix: str = "summary") -> dict[str, float]:
    """The numbers of a run summary, nested keys joined by '/'."""
    found: dict[str, float] = {}
    for key, value in summary.items():
        if key == "versions":
            continue
        if isinstance(value, dict):
            found.update(summary_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[f"{prefix}/{key}"] = float(value)
    return found


def flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    """A recipe as MLflow parameters: dotted keys, JSON values (strings as themselves)."""
    if isinstance(data, dict) and data:
        flat: dict[str, str] = {}
        for key, value in data.items():
            flat.update(flat_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    text = data if isinstance(data, str) else json.dumps(data)
    return {prefix: text[:_MLFLOW_PARAM_LIMIT]}


class RunContext:
    """What a tracker needs to know about the run it records."""

    def __init__(self, recipe, config: dict, out_dir: Path, resumed: bool, start_step: int, saved: dict):
        self.options = recipe.training.tracking
        self.run_name = self.options.run_name or out_dir.resolve().name
        self.config, self.out_dir, self.resumed, self.start_step = config, out_dir, resumed, start_step
        self.saved = saved  # this tracker's entry in trackers.json from the run being resumed ({} if none)


class TensorBoardTracker:
    """Event files in output.dir/tensorboard; a resume drops the events after its checkpoint."""

    name = "tensorboard"

    def __init__(self, ctx: RunContext):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = ctx.out_dir / TENSORBOARD_DIR
        # Steps after the checkpoint are redone: TensorBoard hides the interrupted run's events from there on.
        self.writer = SummaryWriter(str(self.logdir), purge_step=ctx.start_step + 1 if ctx.resumed else None)
        if not ctx.resumed:
            indented = "\n".join("    " + line for line in _yaml(ctx.config).splitlines())  # a Markdown code block
            self.writer.add_text("recipe", indented, 0)
        self.ids: dict = {}
        self.where = f"tensorboard: {self.logdir} (view with: tensorboard --logdir {self.logdir})"

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """A run in an MLflow experiment: the recipe as parameters, each metric's history by step."""

    name = "mlflow"

    def __init__(self, ctx: RunContext):
        options = ctx.options.mlflow
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (ctx.out_dir / MLFLOW_DIR).resolve().as_uri()
            # MLflow 3 refuses its file store unless allowed (its database store needs SQLAlchemy, which
            # mlflow-skinny lacks); the store is this run's own, so allow it for this process.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif uri.startswith(("http://", "https://")):
            # A server that cannot be reached should cost a warning, not minutes of retries (user settings win).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        if ctx.saved.get("tracking_uri") == uri and ctx.saved.get("run_id"):
            self.run_id = ctx.saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            had = set(client.get_run(self.run_id).data.params)
        else:
            experiment = client.get_experiment_by_name(options.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(options.experiment)
            run = client.create_run(experiment_id, run_name=ctx.run_name, tags={"peftcli.output_dir": str(ctx.out_dir)})
            self.run_id, had = run.info.run_id, set()
        # MLflow parameters cannot change: a resume adds only keys the run lacks (a changed max_steps stays as
        # first logged; recipe.yaml has the current value).
        params = [Param(key, value) for key, value in flat_params(ctx.config).items() if key not in had]
        for start in range(0, len(params), _MLFLOW_BATCH):
            client.log_batch(self.run_id, params=params[start : start + _MLFLOW_BATCH])
        self.ids = {"tracking_uri": uri, "run_id": self.run_id}
        self.where = f"mlflow: run {self.run_id} in {uri}"

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


def wandb_mode(setting: str) -> str | None:
    """The W&B mode for training.tracking.wandb.mode (None: wandb reads WANDB_MODE itself)."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbTracker:
    """A W&B run with the recipe as its config; offline (in output.dir/wandb) unless configured online."""

    name = "wandb"

    def __init__(self, ctx: RunContext):
        import wandb

        options = ctx.options.wandb
        resume = {"id": ctx.saved["id"], "resume": "allow"} if ctx.saved.get("id") else {}
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            name=ctx.run_name,
            config=ctx.config,
            dir=str(ctx.out_dir),
            mode=wandb_mode(options.mode),
            settings=wandb.Settings(console="off", silent=True),  # the CLI prints progress; wandb would interleave
            **resume,
        )
        self.ids = {"id": self.run.id}
        if self.run.offline:
            folder = Path(self.run.dir).parent  # run.dir is the run's files/ folder
            self.where = f"wandb: offline run in {folder} (upload with: wandb sync {folder})"
        else:
            self.where = f"wandb: {self.run.url or self.run.id}"

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        if status == "stopped":
            self.run.mark_preempting()  # resumable: W&B shows it as preempted, not crashed
        self.run.finish(exit_code=0 if status == "finished" else 1)


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


class Trackers:
    """The trackers of one run: each record goes to all of them; one that fails is dropped, with a warning."""

    def __init__(self, trackers: list | None = None, warn: Callable[[str], None] = lambda text: None):
        self.trackers, self.warn = list(trackers or []), warn
        self.step = 0

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker's own failure (network, disk, its service) must not end training
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.warn(
                    f"warning: the {tracker.name} tracker failed to {what} ({type(exc).__name__}: {first}); "
                    "training goes on without it"
                )
                self.trackers.remove(tracker)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record, at its step."""
        values, step = scalars(record), int(record["step"])
        self.step = max(self.step, step)
        if values:
            self._each("log metrics", lambda tracker: tracker.log(values, step))

    def summary(self, summary: dict) -> None:
        """The run summary's numbers, at the last step."""
        values = summary_scalars(summary)

        def send(tracker) -> None:
            if hasattr(tracker, "summary"):
                tracker.summary(values)
            else:
                tracker.log(values, self.step)

        self._each("log the summary", send)

    def close(self, status: str) -> None:
        """End every tracker's run as finished, failed or stopped."""
        self._each("close", lambda tracker: tracker.close(status))
        self.trackers = []


@contextmanager
def open_trackers(
    recipe, config: dict, out_dir: Path, resumed: bool, start_step: int, say: Callable[[str], None]
) -> Iterator[Trackers]:
    """Start the recipe's trackers (call on the main process only) and close them however the run ends: finished,
    failed, or stopped by a signal (resumable)."""
    from peftcli.interrupts import Interrupted
    from peftcli.train.preemption import RunStopped

    names = recipe.training.report_to
    path = out_dir / TRACKERS_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if resumed and path.is_file() else {}
    trackers = Trackers(warn=say)
    for name in names:
        try:
            tracker = TRACKERS[name](RunContext(recipe, config, out_dir, resumed, start_step, saved.get(name, {})))
        except Exception as exc:  # unreachable server, no credentials...: the run goes on without this tracker
            first = str(exc).splitlines()[0] if str(exc) else ""
            say(f"warning: training.report_to: {name} could not start ({type(exc).__name__}: {first}); "
                 "training goes on without it")  # fmt: skip
            continue
        trackers.trackers.append(tracker)
        say(tracker.where)
    ids = {**saved, **{tracker.name: tracker.ids for tracker in trackers.trackers if tracker.ids}}
    if ids and ids != saved:
        write_text_atomic(path, json.dumps(ids, indent=2) + "\n")
    try:
        yield trackers
    except (RunStopped, Interrupted, KeyboardInterrupt):
        trackers.close("stopped")
        raise
    except BaseException:
        trackers.close("failed")
        raise
    trackers.close("finished")
