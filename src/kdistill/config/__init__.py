"""Run configuration: pydantic models, loaded from YAML/JSON with `--set` overrides."""

from kdistill.config.load import load_config, save_config, validate_config
from kdistill.config.loss import LossConfig
from kdistill.config.schema import DataConfig, RunConfig, StudentConfig, TeacherConfig
from kdistill.config.training import TrainingConfig

__all__ = [
    "DataConfig",
    "LossConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainingConfig",
    "load_config",
    "save_config",
    "validate_config",
]
