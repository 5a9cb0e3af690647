"""What a principal may do: route scopes, models, priorities. Pure (no Ray).

The auth middleware sets the request's principal in ``PRINCIPAL`` (and in the ASGI scope's
state) before any route runs; ``None`` means auth is off or the loopback bypass let the
request in, which counts as tenant ``default`` with every scope and no limits.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Optional

from orch.api.errors import ErrorCode
from orch.api.keys import Principal
from orch.api.pools import TaskContext
from orch.api.tasks import Priority
from orch.core.errors import OrchError

#: Tenant of requests without a principal.
DEFAULT_TENANT = "default"
#: Tenant of the server's bootstrap token.
ADMIN_TENANT = "admin"

PRINCIPAL: ContextVar[Optional[Principal]] = ContextVar("orch_principal", default=None)


def current_principal() -> Optional[Principal]:
    return PRINCIPAL.get()


def tenant_of(principal: Optional[Principal]) -> str:
    return principal.tenant if principal is not None else DEFAULT_TENANT


def sees_all(principal: Optional[Principal]) -> bool:
    """Admin keys, the bootstrap token and requests without a principal see every tenant's
    tasks, sessions and artifacts."""
    return principal is None or principal.is_admin


def may_see(principal: Optional[Principal], owner: Optional[str]) -> bool:
    """Whether the principal may see something owned by tenant ``owner`` (None: recorded
    before tenants existed, or without a principal: tenant ``default``)."""
    return sees_all(principal) or principal.tenant == (owner or DEFAULT_TENANT)


def check_scope(principal: Optional[Principal], scope: Optional[str]) -> None:
    """403 FORBIDDEN naming the scope a route needs, when the key lacks it."""
    if scope is None or principal is None or scope in principal.scopes:
        return
    held = ", ".join(sorted(principal.scopes)) or "none"
    raise OrchError(ErrorCode.FORBIDDEN,
                    f"this route needs the '{scope}' scope; key {principal.key_id} holds: {held}")


def check_principal(principal: Optional[Principal], request: Any) -> None:
    """Before admission: the key may use this model and this priority (403 otherwise)."""
    if principal is None:
        return
    check_scope(principal, "infer")
    model = getattr(request, "model_ref", None)
    if principal.models is not None and (model is None or model not in principal.models):
        allowed = ", ".join(principal.models) or "none"
        named = f"model '{model}'" if model else "a request without model_ref (any model)"
        raise OrchError(ErrorCode.MODEL_NOT_ALLOWED,
                        f"key {principal.key_id} may not use {named}; model_ref must be one of: {allowed}")
    priority = getattr(request, "priority", Priority.interactive)
    if principal.priority_ceiling == Priority.batch and priority != Priority.batch:
        raise OrchError(ErrorCode.PRIORITY_NOT_ALLOWED,
                        f"key {principal.key_id} may send batch work only; set priority: batch")


def tenant_context(context: Optional[TaskContext], principal: Optional[Principal]) -> Optional[TaskContext]:
    """The task's context with its tenant and fair-queueing weight (unchanged without a principal)."""
    if principal is None:
        return context
    return replace(context or TaskContext(), tenant=principal.tenant, weight=principal.weight)


# ---------------------------------------------------------------------------- isolation
#
# Tasks and sessions of a tenant key live under ids prefixed ``<tenant>:``: the ingress adds
# the prefix when a task is admitted and when an id arrives in a path, so another tenant's
# id (with or without its prefix) never names anything this key can reach: 404, the same
# answer as an id that does not exist. Keys that see everything use ids as they are.


def scoped_id(principal: Optional[Principal], value: Optional[str]) -> Optional[str]:
    """The id a task or session id from this principal stands for."""
    if value is None or sees_all(principal):
        return value
    prefix = principal.tenant + ":"
    return value if value.startswith(prefix) else prefix + value


def scoped_task(task: Any, principal: Optional[Principal]) -> Any:
    """The request with its task and session ids under the principal's tenant (a task
    without an id gets one)."""
    if sees_all(principal):
        return task
    task_id = scoped_id(principal, task.task_id or uuid.uuid4().hex)
    return task.model_copy(update={"task_id": task_id, "session_id": scoped_id(principal, task.session_id)})


def owns_artifact(principal: Optional[Principal], record: dict[str, Any]) -> bool:
    """An artifact is its tenant's (``metadata.tenant``, stamped at creation) or belongs to
    one of its tasks or sessions (a transcript's ``task:`` / ``session:`` tags)."""
    if sees_all(principal):
        return True
    if (record.get("metadata") or {}).get("tenant") == principal.tenant:
        return True
    prefixes = (f"task:{principal.tenant}:", f"session:{principal.tenant}:")
    return any(str(tag).startswith(prefixes) for tag in record.get("tags") or ())


def stamped(principal: Optional[Principal], metadata: dict[str, Any]) -> dict[str, Any]:
    """An artifact's metadata with its owning tenant (kept as given for keys that see all)."""
    if sees_all(principal):
        return metadata
    return dict(metadata, tenant=principal.tenant)


def admit_as(principal: Optional[Principal], task: Any) -> Any:
    """Admission's first step: the key may send this task (403 otherwise); its ids are
    scoped to the key's tenant."""
    check_principal(principal, task)
    return scoped_task(task, principal)
