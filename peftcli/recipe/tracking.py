"""Recipe options of the experiment trackers (`training.report_to`, `training.tracking`).

Only what a user needs to point a run somewhere; everything else keeps the tracker's own default. Nothing here
imports a tracker: a recipe validates without them installed (the trainer checks they are, before loading).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftcli.recipe.base import StrictModel

TrackerName = Literal["tensorboard", "mlflow", "wandb"]


class MlflowOptions(StrictModel):
    """Where MLflow records the run."""

    tracking_uri: str | None = Field(
        None,
        description="A tracking server (http://...) or store URI. Default: MLFLOW_TRACKING_URI when set, else a "
        "local store in output.dir/mlruns.",
    )
    experiment: str = Field("peftcli", min_length=1, description="Experiment name; created when missing.")


class WandbOptions(StrictModel):
    """Where Weights & Biases records the run."""

    project: str = Field("peftcli", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; default: the account's own.")
    mode: Literal["auto", "offline", "online"] = Field(
        "auto",
        description="auto: online only when WANDB_MODE or WANDB_API_KEY says so, else offline (written to "
        "output.dir/wandb; upload later with `wandb sync`). online: send as the run goes.",
    )


class TrackingSection(StrictModel):
    """Options of the trackers listed in training.report_to."""

    run_name: str | None = Field(
        None, min_length=1, description="The run's name in every tracker; default: output.dir's name."
    )
    mlflow: MlflowOptions = Field(default_factory=MlflowOptions)
    wandb: WandbOptions = Field(default_factory=WandbOptions)
