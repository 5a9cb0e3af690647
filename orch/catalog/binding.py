"""Where a pool's model ref meets the catalog: what the pool loads, or why it waits.

The supervisor reads the catalog (model records, handoff records, provisioning progress) and
turns each pool's configured ``model`` into a binding with one of four statuses:

- ``ready``: load ``model_path`` (an Active catalog record's ``local_path``, or a handoff's
  ``model_path``), or attach to the handed-off ``engine_url``; ``model_digest`` is reported;
- ``local``: the catalog knows nothing of this local ref (``pkg:``, ``file:``); the pool
  resolves it itself, as configured;
- ``waiting``: a ref that must be fetched (``hf:``, ``https://``...) and is not provisioned
  yet; the pool is not Ready, queues tasks if fetching is allowed, and is not failing;
- ``retired``: the catalog has the model only in state Retired; the pool is not Ready.

A handoff applies to a pool when it names the pool (``pool_id``), else when it names the
pool's model ref and engine; the newest wins. Plain Python, no Ray.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from orch.api.pools import LOCAL, READY, RETIRED, WAITING, CatalogBinding
from orch.api.preparation import PrepStatus, PrepStep
from orch.core.model_ref import FETCH_SCHEMES, ModelRefError, catalog_ref, parse_ref

__all__ = ["CatalogBinding", "LOCAL", "READY", "RETIRED", "WAITING", "accepts_tasks", "catalog_key", "handoff_for",
           "how_to_provide", "needs_fetch", "preparation", "resolve", "runtime_env_key", "step_of", "with_step"]
#: Engines that run inside the pool actor: nothing to provision beyond the Python package.
IN_PROCESS_ENGINES = ("llamacpp", "vllm", "mock")

#: The fields that decide what a pool loads; a change of any of them means a reload.
_LOAD_FIELDS = ("model_path", "model_digest", "engine_url", "engine_binary", "runtime_env")


def catalog_key(model: str, base_dir: Optional[Path | str] = None) -> Optional[str]:
    """The catalog's key for a configured ref (canonical; relative paths made absolute), or
    None when it does not parse as a ref (such a pool never binds through the catalog)."""
    try:
        ref = parse_ref(model)
    except ModelRefError:
        return None
    return catalog_ref(ref, str(base_dir) if base_dir is not None else None)


def needs_fetch(model: str) -> bool:
    """The ref names something that must be downloaded before any pool can load it."""
    try:
        return parse_ref(model).scheme in FETCH_SCHEMES
    except ModelRefError:
        return False


def _newest(items: Iterable[dict[str, Any]]) -> Optional[dict[str, Any]]:
    ranked = sorted(items, key=lambda item: (-float(item.get("updated_at") or 0), item["id"]))
    return ranked[0] if ranked else None


def handoff_for(pool_id: str, engine: str, key: Optional[str], handoffs: Iterable[dict[str, Any]],
                base_dir: Optional[Path | str] = None) -> Optional[dict[str, Any]]:
    handoffs = list(handoffs)
    named = [h for h in handoffs if h.get("pool_id") == pool_id]
    if named:
        return _newest(named)
    if key is None:
        return None
    return _newest(h for h in handoffs if h.get("pool_id") is None and h.get("engine") == engine
                   and h.get("model_ref") and catalog_key(h["model_ref"], base_dir) == key)


def resolve(pool_id: str, engine: str, model: str, records: Iterable[dict[str, Any]],
            handoffs: Iterable[dict[str, Any]], base_dir: Optional[Path | str] = None, *,
            attached_url: Optional[str] = None) -> CatalogBinding:
    """The binding of one pool (see the module docstring). ``attached_url`` is the server an
    ``external`` pool's config already names; without it (and without a handoff) it waits."""
    key = catalog_key(model, base_dir)
    binding = CatalogBinding(pool_id=pool_id, model_ref=key or model)
    mine = [r for r in records if key is not None and r.get("ref") == key]
    active = _newest(r for r in mine if r.get("state") == "Active")
    retired = _newest(r for r in mine if r.get("state") == "Retired")
    handoff = handoff_for(pool_id, engine, key, handoffs, base_dir)
    if active is None and retired is not None:
        return _keyed(binding.but(status=RETIRED, model_id=retired["id"], model_digest=retired["digest"], note=(
            f"model retired: catalog model '{retired['id']}' ({retired['ref']}) is Retired; set it Active again "
            f"(POST /v2/catalog/models/{retired['id']}/state) to serve it")))
    if active is not None:
        binding = binding.but(status=READY, model_path=active["local_path"], model_digest=active["digest"],
                              model_id=active["id"])
    if handoff is not None:
        binding = binding.but(handoff_id=handoff["id"], engine_url=handoff.get("url"),
                              engine_binary=handoff.get("binary_path"), engine_version=handoff.get("engine_version"),
                              engine_mode=handoff.get("mode"), runtime_env=dict(handoff.get("runtime_env") or {}),
                              api_key_env=handoff.get("api_key_env"))
        if handoff.get("model_path"):
            binding = binding.but(status=READY, model_path=handoff["model_path"],
                                  model_digest=handoff.get("model_digest"), model_id=handoff.get("model_id"))
        elif handoff.get("url") and binding.status != READY:
            binding = binding.but(status=READY, model_digest=handoff.get("model_digest"),
                                  model_id=handoff.get("model_id"))
    if binding.status != READY:
        if engine == "external" and not attached_url:
            binding = binding.but(status=WAITING, note=(
                f"waiting for an external engine: pool '{pool_id}' names no base_url; hand one off (a handoff "
                "record or a JSON file in catalog.handoff_dir naming this pool and the server's url)"))
        elif engine != "external" and needs_fetch(model):
            binding = binding.but(status=WAITING, note=(
                f"waiting for model {key}: it is not in the catalog yet; it is fetched when a task needs it "
                "(if the outbound policy allows), or provision it with POST /v2/catalog/models, or hand it off"))
        else:
            binding = binding.but(status=LOCAL)
    if binding.runtime_env:
        binding = binding.but(runtime_env_key=runtime_env_key(binding.runtime_env))
    return _keyed(binding)


def _keyed(binding: CatalogBinding) -> CatalogBinding:
    """Add ``load_key``: equal keys load the same thing, so the pool keeps its engine."""
    loads = {name: getattr(binding, name) for name in _LOAD_FIELDS} if binding.status in (READY, LOCAL) else {}
    loads["status"] = binding.status if binding.status in (WAITING, RETIRED) else "load"
    return binding.but(load_key=hashlib.sha256(json.dumps(loads, sort_keys=True).encode()).hexdigest()[:16])


def runtime_env_key(runtime_env: Optional[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(runtime_env or {}, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- preparation


def how_to_provide(model_ref: str) -> str:
    return (f"provision it: POST /v2/catalog/models {{\"ref\": \"{model_ref}\"}} (orch models pull {model_ref}), "
            "or hand it off: a handoff record naming this model_ref, or a JSON file in catalog.handoff_dir")


def _step(step: PrepStep, status: PrepStatus, pct: float, detail: Optional[str] = None) -> dict[str, Any]:
    return {"step": step.value, "status": status.value, "pct": round(max(0.0, min(100.0, pct)), 1), "detail": detail}


def preparation(binding: CatalogBinding, engine: str, *, fetch_allowed: bool, blocked_reason: Optional[str] = None,
                progress: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The preparation plan of a pool from its binding and the catalog's progress for its ref
    (``pool_warmup`` is pending here; the pool itself moves it on as it loads)."""
    if binding.engine_mode:
        engine_step = _step(PrepStep.engine_provision, PrepStatus.done, 100,
                            f"handed off ({binding.engine_mode}, handoff '{binding.handoff_id}')")
    else:
        engine_step = _step(PrepStep.engine_provision, PrepStatus.skipped, 100,
                            f"{engine} runs in the pool actor" if engine in IN_PROCESS_ENGINES else None)
    reason = None
    status = binding.status
    if engine == "external" and status == WAITING:
        reason = binding.note
        return {
            "pool_id": binding.pool_id, "model_ref": binding.model_ref, "fetch_allowed": False,
            "steps": [_step(PrepStep.engine_provision, PrepStatus.blocked, 0, "waiting for an engine handoff"),
                      _step(PrepStep.model_fetch, PrepStatus.skipped, 100, "the external server holds the model"),
                      _step(PrepStep.pool_warmup, PrepStatus.pending, 0)],
            "reason": reason,
            "how": "hand off the server: a handoff record or a JSON file in catalog.handoff_dir with this pool_id "
                   "and the server's url (see orch/catalog/handoff_files.py)",
        }
    if status == RETIRED:
        reason, fetch_allowed = binding.note, False
        fetch = _step(PrepStep.model_fetch, PrepStatus.blocked, 0, "the model is Retired in the catalog")
    elif status in (READY, LOCAL):
        fetch = _step(PrepStep.model_fetch, PrepStatus.done, 100, binding.model_path)
    elif progress is not None and progress.get("phase") == "running":
        done, total = int(progress.get("done") or 0), progress.get("total")
        pct = 100.0 * done / total if total else 0.0
        fetch = _step(PrepStep.model_fetch, PrepStatus.running, pct,
                      f"{done} of {total} bytes" if total else f"{done} bytes")
    elif progress is not None and progress.get("phase") == "failed":
        reason = f"fetching the model failed: {progress.get('error')}"
        fetch = _step(PrepStep.model_fetch, PrepStatus.failed, 0, progress.get("error"))
    elif progress is not None and progress.get("phase") == "done":
        fetch = _step(PrepStep.model_fetch, PrepStatus.done, 100, "provisioned; binding the pool")
    elif fetch_allowed:
        fetch = _step(PrepStep.model_fetch, PrepStatus.pending, 0, "starts when a task needs the model")
    else:
        reason = blocked_reason or "the orchestrator may not fetch this model itself"
        fetch = _step(PrepStep.model_fetch, PrepStatus.blocked, 0, reason)
    warmup = _step(PrepStep.pool_warmup, PrepStatus.pending, 0)
    return {
        "pool_id": binding.pool_id,
        "model_ref": binding.model_ref,
        "fetch_allowed": bool(fetch_allowed),
        "steps": [engine_step, fetch, warmup],
        "reason": reason,
        "how": None if status in (READY, LOCAL) else how_to_provide(binding.model_ref),
    }


def step_of(prep: dict[str, Any], step: PrepStep) -> dict[str, Any]:
    for item in prep.get("steps", []):
        if item["step"] == step.value:
            return item
    raise KeyError(step.value)


def with_step(prep: dict[str, Any], step: PrepStep, status: PrepStatus, pct: float,
              detail: Optional[str] = None) -> dict[str, Any]:
    """A copy of ``prep`` with one step replaced."""
    steps = [(_step(step, status, pct, detail) if item["step"] == step.value else dict(item))
             for item in prep.get("steps", [])]
    return dict(prep, steps=steps)


def accepts_tasks(prep: Optional[dict[str, Any]]) -> bool:
    """Whether a waiting pool with this plan may queue tasks: the model is on its way (being
    fetched, or fetched on demand) or already here and loading."""
    if prep is None:
        return False
    fetch = step_of(prep, PrepStep.model_fetch)["status"]
    if fetch in (PrepStatus.done.value, PrepStatus.skipped.value, PrepStatus.running.value):
        return True
    return bool(prep.get("fetch_allowed")) and fetch == PrepStatus.pending.value
