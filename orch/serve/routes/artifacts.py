"""``/v2/artifacts``: store and read content-addressed artifacts (task transcripts among them)."""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.actors import ActorClient
from orch.api.artifacts import ARTIFACT_ID_PATTERN, Artifact, ArtifactCreate, ArtifactCreated
from orch.api.errors import ErrorCode
from orch.artifacts.actor import PENDING_WAIT_S, artifact_actor
from orch.artifacts.store import artifact_body
from orch.core.errors import OrchError
from orch.serve.http import explain_validation, invalid, read_json
from orch.serve.auth import principal_of
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState
from orch.tenants.access import owns_artifact, stamped

_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)


def routes(state: IngressState) -> list[ApiRoute]:
    max_body = state.config.server.max_body_bytes

    # A lost store actor is looked up (or created again, over the same directory) by name once.
    store = ActorClient(lambda: artifact_actor(state.config.artifacts.root, state.config.namespace),
                        lost=_store_lost)
    store.handle = state.artifacts

    def actor() -> ActorClient:
        if state.artifacts is None:
            raise OrchError(ErrorCode.POOL_UNAVAILABLE, "the artifact store is not reachable from this ingress",
                            retriable=True, retry_after_ms=1000)
        return store

    async def create(request: Request) -> Response:
        body = await read_json(request, max_body)
        try:
            item = ArtifactCreate.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        try:
            record = artifact_body(item.kind.value, item.content, tags=item.tags, parent=item.parent,
                                   metadata=stamped(principal_of(request), item.metadata))
            result = await actor().call("put", record)
        except ValueError as exc:  # e.g. NaN in content: not canonical JSON
            raise invalid(f"artifact cannot be stored: {exc}") from None
        return JSONResponse(ArtifactCreated(**result).model_dump(), status_code=201 if result["created"] else 200)

    async def read(request: Request) -> Response:
        art_id = request.path_params["artifact_id"]
        if not _ARTIFACT_ID.match(art_id):
            raise invalid("artifact id must be 'sha256:' followed by 64 lowercase hex digits")
        record = await actor().call("get", art_id, PENDING_WAIT_S)
        if record is None or not owns_artifact(principal_of(request), record):
            raise OrchError(ErrorCode.NOT_FOUND, f"no artifact '{art_id}'")
        return JSONResponse(record)

    return [
        ApiRoute("POST", "/v2/artifacts", create, "Store an artifact; its id is the sha256 of its canonical content",
                 "artifacts", body=ArtifactCreate, answers={201: ArtifactCreated, 200: ArtifactCreated}, scope="infer"),
        ApiRoute("GET", "/v2/artifacts/{artifact_id}", read, "Read an artifact (task transcripts included)",
                 "artifacts", answers={200: Artifact}, scope="infer"),
    ]


def _store_lost(exc: BaseException) -> OrchError:
    return OrchError(ErrorCode.POOL_UNAVAILABLE, "the artifact store restarted; retry", retriable=True,
                     retry_after_ms=500)
