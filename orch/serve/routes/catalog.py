"""``/v2/catalog/models``: provision models into the catalog, read, verify, retire, delete them.
``/v2/catalog/engines``: plan (``dry_run``) or provision an engine and hand it off.
``/v2/catalog/handoffs``: the handoff records pools bind to (list, hand one off, remove one).

The catalog actor holds the records; the routes reach it through an ``ActorClient`` (the
deployment's handle first, found again by name once after a restart). Provisioning runs as a Ray
task on the target node (the ingress's node unless ``node_id`` says otherwise) and stores its
record itself. Bad refs, refused downloads and digest mismatches are 400 ``INVALID_PARAMS``;
an unreachable catalog is 503 ``POOL_UNAVAILABLE``. The pool supervisor sees every change
within a reconcile round and binds the pools that wait for it (no ingress restart).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Optional

import ray
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orch.api.catalog import (
    SCHEMA_VERSION,
    CatalogModel,
    EnginePlanBody,
    EngineProvisionRequest,
    HandoffList,
    HandoffRecord,
    ModelCreate,
    ModelList,
    ModelState,
    ModelStateChange,
    ProvisionPlanBody,
    VerifyResult,
)
from orch.actors import ActorClient
from orch.api.errors import ErrorCode
from orch.catalog.actor import catalog_actor
from orch.catalog.binding import catalog_key
from orch.config import project_root
from orch.core.errors import OrchError
from orch.core.model_ref import ModelRefError
from orch.provision.errors import ProvisionError
from orch.provision import engines as engine_provision
from orch.provision.models import ProvisionSettings, check_handoff_paths, plan
from orch.provision.tasks import (
    alive_node_ids,
    start_digest,
    start_engine_provision,
    start_preflight,
    start_provision,
    start_removal,
    unwrap,
)
from orch.serve.http import explain_validation, invalid, no_content, read_json
from orch.serve.routes.tasks import path_id
from orch.serve.routing import ApiRoute
from orch.serve.state import IngressState

log = logging.getLogger("orch.ingress")

#: Longest one catalog actor call may take (they only touch small files).
ACTOR_TIMEOUT_S = 15.0
#: Digest of a large model on a slow disk.
VERIFY_TIMEOUT_S = 1800.0
REMOVE_TIMEOUT_S = 120.0


class CatalogRoutes:
    """The catalog endpoints over an injected client of the catalog actor."""

    def __init__(self, state: IngressState, catalog: ActorClient) -> None:
        self.state = state
        self.catalog = catalog
        self.max_body = state.config.server.max_body_bytes
        self.settings = ProvisionSettings.from_config(state.config.catalog, base_dir=project_root())
        self.engine_settings = engine_provision.EngineSettings.from_config(state.config.catalog,
                                                                           base_dir=project_root())
        self.pool_ids = {pool.id for pool in state.config.pools}

    # -- plumbing ------------------------------------------------------------------------
    async def call(self, method: str, *args: Any) -> Any:
        """One catalog actor call; after the actor was replaced (killed and started again),
        the client reconnects once and retries."""
        try:
            return await self.catalog.call(method, *args)
        except asyncio.TimeoutError:
            raise unavailable(f"did not answer within {ACTOR_TIMEOUT_S:.0f} s") from None

    async def body_of(self, request: Request, model):
        body = await read_json(request, self.max_body)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None

    async def record_of(self, request: Request) -> dict[str, Any]:
        model_id = path_id(request, "model_id", "model")
        record = await self.call("get", model_id)
        if record is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no model '{model_id}' in the catalog")
        return record

    async def waiting_node(self, ref: str) -> Optional[str]:
        """The node of a pool that waits for ``ref``: its files must land where it loads them
        (None: this ingress's node)."""
        rows = await self.state.registry.rows()
        for pool_id in sorted(rows):
            row = rows[pool_id]
            if row.waiting_for_model and row.node_id and catalog_key(row.model_ref, project_root()) == ref:
                return row.node_id
        return None

    def check_pool(self, pool_id: Optional[str]) -> None:
        if pool_id is not None and pool_id not in self.pool_ids:
            raise invalid(f"pool_id '{pool_id}' names no configured pool; "
                          f"configured: {', '.join(sorted(self.pool_ids))}")

    # -- models --------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        wanted = await self.body_of(request, ModelCreate)
        try:
            steps = plan(wanted.ref, self.settings, model_id=wanted.id, digest=wanted.digest)
        except ModelRefError as exc:
            raise invalid(str(exc)) from None
        except ProvisionError as exc:
            raise exc.to_orch_error() from None
        if wanted.dry_run:
            return JSONResponse(ProvisionPlanBody(**steps.to_dict()).model_dump())
        await check_node(wanted.node_id)
        node_id = wanted.node_id or await self.waiting_node(steps.ref)
        claim = await self.call("begin", steps.model_id, steps.ref, wanted.digest, self.settings.deadline_s + 60)
        if claim["status"] == "exists":
            return JSONResponse(CatalogModel(**claim["record"]).model_dump(mode="json"), status_code=200)
        if claim["status"] == "conflict":
            other = claim["record"]
            raise invalid(f"model id '{steps.model_id}' already names {other['ref']} ({other['digest']}); "
                          "choose another id, or DELETE it first")
        if claim["status"] == "busy":
            raise OrchError(ErrorCode.ADMISSION_REJECT, f"model '{steps.model_id}' is being provisioned right now; "
                            "retry when it is done", retriable=True, retry_after_ms=2000, policy_label="reject")
        try:
            task = start_provision(steps, self.settings, await self.catalog.get(), node_id)
        except Exception as exc:
            await self.call("finish", steps.model_id, str(exc))
            raise unavailable(f"could not start provisioning: {exc}") from None
        record = await wait_task(task, self.settings.deadline_s + 60, f"provisioning '{steps.model_id}'")
        return JSONResponse(CatalogModel(**record).model_dump(mode="json"), status_code=201)

    async def list_models(self, request: Request) -> Response:
        state_filter = request.query_params.get("state")
        if state_filter is not None and state_filter not in {s.value for s in ModelState}:
            raise invalid("state must be Active or Retired")
        records = await self.call("list", state_filter)
        return JSONResponse(ModelList(models=[CatalogModel(**r) for r in records]).model_dump(mode="json"))

    async def read(self, request: Request) -> Response:
        record = await self.record_of(request)
        return JSONResponse(CatalogModel(**record).model_dump(mode="json"))

    async def delete(self, request: Request) -> Response:
        model_id = path_id(request, "model_id", "model")
        removed = await self.call("remove", model_id)
        if removed is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no model '{model_id}' in the catalog")
        record = removed["record"]
        if record["managed"] and not removed["shared"]:
            try:
                task = start_removal(record["local_path"], self.state.config.catalog.model_cache,
                                     record.get("node_id"))
                await wait_task(task, REMOVE_TIMEOUT_S, f"removing the files of '{model_id}'")
            except OrchError as exc:  # the record is gone; stray files are only disk space
                log.warning("model %s: its files at %s were not removed: %s", model_id, record["local_path"],
                            exc.message)
        return no_content()

    async def verify(self, request: Request) -> Response:
        record = await self.record_of(request)
        task = start_digest(record["local_path"], record.get("node_id"))
        found = await wait_task(task, VERIFY_TIMEOUT_S, f"verifying '{record['id']}'")
        actual = found["digest"] if found else None
        ok = actual == record["digest"]
        await self.call("record_verification", record["id"], ok, actual)
        if found is None:
            result, message = "missing", f"no files at {record['local_path']}"
        elif ok:
            result, message = "ok", "digest matches"
        else:
            result, message = "mismatch", "digest differs from the recorded one; the files changed"
        self.state.counters.verified(result)
        return JSONResponse(VerifyResult(
            id=record["id"], ok=ok, expected=record["digest"], actual=actual,
            size_bytes=found["size_bytes"] if found else None, checked_at=time.time(), message=message,
        ).model_dump())

    async def change_state(self, request: Request) -> Response:
        model_id = path_id(request, "model_id", "model")
        wanted = await self.body_of(request, ModelStateChange)
        record = await self.call("set_state", model_id, ModelState(wanted.state).value)
        if record is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no model '{model_id}' in the catalog")
        return JSONResponse(CatalogModel(**record).model_dump(mode="json"))

    # -- engines and handoffs ------------------------------------------------------------
    async def provision_engine(self, request: Request) -> Response:
        wanted = await self.body_of(request, EngineProvisionRequest)
        self.check_pool(wanted.pool_id)
        try:
            steps = engine_provision.plan(wanted.spec, self.engine_settings, handoff_id=wanted.id,
                                          pool_id=wanted.pool_id, model_ref=canonical_model_ref(wanted.model_ref))
        except ProvisionError as exc:
            raise exc.to_orch_error() from None
        await check_node(wanted.node_id)
        if wanted.dry_run:
            missing = await wait_task(start_preflight(steps, wanted.node_id), 60, "the preflight")
            body = dict(steps.to_dict(), preflight_ok=not missing, missing=missing)
            return JSONResponse(EnginePlanBody(**body).model_dump(mode="json"))
        task = start_engine_provision(steps, self.engine_settings, await self.catalog.get(), wanted.node_id)
        record = await wait_task(task, self.engine_settings.step_timeout_s * 3 + 60,
                                 f"provisioning engine '{steps.handoff_id}'")
        return JSONResponse(HandoffRecord(**record).model_dump(mode="json"), status_code=201)

    async def list_handoffs(self, request: Request) -> Response:
        records = await self.call("list_handoffs")
        return JSONResponse(HandoffList(handoffs=[HandoffRecord(**r) for r in records]).model_dump(mode="json"))

    async def hand_off(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        if not isinstance(body, dict):
            raise invalid("a handoff is a JSON object (see HandoffRecord)")
        reserved = [name for name in ("origin", "created_at", "updated_at") if name in body]
        if reserved:
            raise invalid(f"{', '.join(reserved)} are set by the catalog")
        if body.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise invalid(f"schema_version must be {SCHEMA_VERSION}, the catalog schema this release writes")
        try:
            wanted = HandoffRecord.model_validate(dict(body, origin="api"))
        except ValidationError as exc:
            raise invalid(explain_validation(exc)) from None
        self.check_pool(wanted.pool_id)
        record = wanted.model_dump(mode="json", exclude={"created_at", "updated_at"})
        try:
            check_handoff_paths(record, self.settings)
        except ProvisionError as exc:
            raise exc.to_orch_error() from None
        record["model_ref"] = canonical_model_ref(record["model_ref"])
        existed = await self.call("get_handoff", wanted.id) is not None
        stored = await self.call("put_handoff", record)
        return JSONResponse(HandoffRecord(**stored).model_dump(mode="json"), status_code=200 if existed else 201)

    async def read_handoff(self, request: Request) -> Response:
        handoff_id = path_id(request, "handoff_id", "handoff")
        record = await self.call("get_handoff", handoff_id)
        if record is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no handoff '{handoff_id}'")
        return JSONResponse(HandoffRecord(**record).model_dump(mode="json"))

    async def remove_handoff(self, request: Request) -> Response:
        handoff_id = path_id(request, "handoff_id", "handoff")
        if await self.call("remove_handoff", handoff_id) is None:
            raise OrchError(ErrorCode.NOT_FOUND, f"no handoff '{handoff_id}'")
        return no_content()


def catalog_client(state: IngressState) -> ActorClient:
    """A client of the catalog actor, starting from the handle the deployment made (if any)."""
    config = state.config

    def connect() -> Any:
        try:
            return catalog_actor(config.catalog.root, config.namespace)
        except Exception as exc:  # not connected to Ray, or the actor cannot start
            raise unavailable(f"is not reachable from this ingress ({exc})") from None

    client = ActorClient(connect, timeout=ACTOR_TIMEOUT_S,
                         lost=lambda exc: unavailable(f"actor is down; retry ({_cause_line(exc)})"))
    client.handle = state.extras.get("catalog")
    return client


def routes(state: IngressState, catalog: Optional[ActorClient] = None) -> list[ApiRoute]:
    r = CatalogRoutes(state, catalog or catalog_client(state))
    return [
        ApiRoute("POST", "/v2/catalog/engines", r.provision_engine,
                 "Provision an engine (external, package, container, binary, source) and hand it off; dry_run "
                 "answers the plan and the preflight", "catalog", body=EngineProvisionRequest,
                 answers={201: HandoffRecord, 200: EnginePlanBody}, scope="catalog"),
        ApiRoute("GET", "/v2/catalog/handoffs", r.list_handoffs, "Every handoff record pools bind to", "catalog",
                 answers={200: HandoffList}, scope="catalog"),
        ApiRoute("POST", "/v2/catalog/handoffs", r.hand_off,
                 "Hand off an engine and/or a model; pools waiting for it bind to it", "catalog",
                 body=HandoffRecord, answers={201: HandoffRecord, 200: HandoffRecord}, scope="catalog"),
        ApiRoute("GET", "/v2/catalog/handoffs/{handoff_id}", r.read_handoff, "A handoff record", "catalog",
                 answers={200: HandoffRecord}, scope="catalog"),
        ApiRoute("DELETE", "/v2/catalog/handoffs/{handoff_id}", r.remove_handoff,
                 "Remove a handoff; pools bound to it hold until another binding applies", "catalog",
                 answers={204: None}, scope="catalog"),
        ApiRoute("POST", "/v2/catalog/models", r.create,
                 "Provision a model (hf:, https://, file:, pkg:) into the catalog; dry_run answers the plan",
                 "catalog", body=ModelCreate, answers={201: CatalogModel, 200: CatalogModel}, scope="catalog"),
        ApiRoute("GET", "/v2/catalog/models", r.list_models, "Every model in the catalog", "catalog",
                 answers={200: ModelList}, query={"state": "Active or Retired"}, scope="catalog"),
        ApiRoute("GET", "/v2/catalog/models/{model_id}", r.read, "A model's catalog record", "catalog",
                 answers={200: CatalogModel}, scope="catalog"),
        ApiRoute("DELETE", "/v2/catalog/models/{model_id}", r.delete,
                 "Remove a model; files the catalog downloaded go with it (never a user's own file)", "catalog",
                 answers={204: None}, scope="catalog"),
        ApiRoute("POST", "/v2/catalog/models/{model_id}/verify", r.verify,
                 "Recompute the model's digest from its files and compare it with the record", "catalog",
                 answers={200: VerifyResult}, scope="catalog"),
        ApiRoute("POST", "/v2/catalog/models/{model_id}/state", r.change_state, "Set a model Active or Retired",
                 "catalog", body=ModelStateChange, answers={200: CatalogModel}, scope="catalog"),
    ]


def unavailable(why: str) -> OrchError:
    return OrchError(ErrorCode.POOL_UNAVAILABLE, f"the model catalog {why}", retriable=True, retry_after_ms=1000)


async def wait_task(ref: "ray.ObjectRef", timeout_s: float, what: str) -> Any:
    """A provisioning task's result; its failures become typed errors."""
    try:
        return await asyncio.wait_for(ref, timeout_s)
    except asyncio.TimeoutError:
        raise OrchError(ErrorCode.POOL_UNAVAILABLE, f"{what} did not finish within {timeout_s:.0f} s",
                        retriable=True, retry_after_ms=5000) from None
    except ray.exceptions.RayError as exc:
        cause = unwrap(exc)
        if isinstance(cause, ProvisionError):
            raise cause.to_orch_error() from None
        if isinstance(cause, ModelRefError):
            raise invalid(str(cause)) from None
        log.warning("%s failed: %s", what, exc)
        raise OrchError(ErrorCode.POOL_UNAVAILABLE, f"{what} failed: {str(cause).splitlines()[0][:300]}",
                        retriable=True, retry_after_ms=5000) from None


async def check_node(node_id: Optional[str]) -> None:
    if node_id is not None and node_id not in await asyncio.to_thread(alive_node_ids):
        raise invalid(f"node_id {node_id} is not an alive node of this Ray cluster")


def canonical_model_ref(raw: Optional[str]) -> Optional[str]:
    if raw is None:
        return None
    key = catalog_key(raw, project_root())
    if key is None:
        raise invalid(f"model_ref {raw[:200]!r} is not a model ref")
    return key


def _cause_line(exc: BaseException) -> str:
    """The last ``SomethingError: message`` line of a Ray error (why an actor died)."""
    lines = [line.strip() for line in str(exc).splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", line)]
    return (lines[-1] if lines else exc.__class__.__name__)[:300]
