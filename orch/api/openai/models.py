"""``GET /v1/models``: the models Ready pools serve."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from orch.api.openai.common import OWNED_BY


class ModelCard(BaseModel):
    """A model a Ready pool serves; ``id`` is what requests name in ``model``."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNED_BY


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
