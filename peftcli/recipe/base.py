"""The base of every recipe model: unknown keys are errors, never silently dropped."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A recipe section: extra keys forbidden, defaults validated, values re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)
