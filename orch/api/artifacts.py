"""Artifacts contract: content-addressed records of plans, transcripts, logs and more."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

ARTIFACT_ID_PATTERN = r"^sha256:[0-9a-f]{64}$"


class ArtifactKind(str, Enum):
    plan = "plan"
    summary = "summary"
    diff = "diff"
    trace = "trace"
    transcript = "transcript"
    logs = "logs"
    other = "other"


class ArtifactCreate(BaseModel):
    """``POST /v2/artifacts`` body. The id is the sha256 of the canonical JSON of these
    fields (tags sorted), so posting the same artifact twice gives the same id."""

    model_config = ConfigDict(extra="forbid")

    kind: ArtifactKind
    content: Any = Field(description="any JSON value")
    tags: list[str] = Field(default_factory=list, max_length=64)
    parent: Optional[str] = Field(default=None, pattern=ARTIFACT_ID_PATTERN)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _short_tags(cls, value: list[str]) -> list[str]:
        if any(not tag or len(tag) > 128 for tag in value):
            raise ValueError("tags must be 1-128 characters each")
        return value


class ArtifactCreated(BaseModel):
    """201 (new) or 200 (already stored) body of ``POST /v2/artifacts``."""

    id: str
    created: bool


class Artifact(BaseModel):
    """A stored artifact."""

    id: str
    kind: ArtifactKind
    content: Any
    tags: list[str]
    parent: Optional[str] = None
    metadata: dict[str, Any]
    created_at: float = Field(description="seconds since the epoch")
