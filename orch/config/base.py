"""What every config section shares: strict models, the error, the project's root."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot run; the message says where and what to fix."""


class Strict(BaseModel):
    """Unknown keys are refused (a typo never falls back to a default); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]
