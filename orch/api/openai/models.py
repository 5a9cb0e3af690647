"""``GET /v1/models``: the models Ready pools serve."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, model_serializer

from orch.api.models import ModelStatus
from orch.api.openai.common import OWNED_BY


class ModelPool(BaseModel):
    """A Ready pool serving the model: its engine and the request parameters it honours."""

    pool_id: str
    engine: str
    parameters: list[str]


class ModelCard(BaseModel):
    """A model a Ready pool serves; ``id`` is what requests name in ``model``; ``pools``
    (an extension) says which parameters each pool serving it honours."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = OWNED_BY
    pools: list[ModelPool] = Field(default_factory=list)
    #: A model of the configured model set (an extension): loaded or not, where, since, last used, pinned.
    model_set: Optional[ModelStatus] = None

    @model_serializer(mode="wrap")
    def _without_empty_model_set(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("model_set") is None:
            data.pop("model_set", None)
        return data


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
