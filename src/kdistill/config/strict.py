"""The base of every config section."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors: a typo such as `learnig_rate` must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
