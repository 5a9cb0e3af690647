"""Per-key limits and usage: requests and tokens per minute, tasks at once, token budgets.

One ``LimitBook`` holds every key's windows; the limiter actor (orch/tenants/limiter.py)
owns the only one, so a reservation is atomic across ingress replicas. Windows slide: a key
with ``rpm`` N is admitted at most N times in any 60 seconds. Tokens are reserved on
admission (an estimate of the prompt plus ``max_tokens``) and settled with the task's real
usage when it ends, however it ends; budgets run per calendar day or month in UTC.
Time is a parameter (unix seconds), so the rules are tested without a clock.
"""

from __future__ import annotations

import calendar
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from orch.api.keys import KeyLimits

#: Seconds a per-minute window spans.
WINDOW_S = 60.0
#: Every refusal's label: the limit that refused.
LABELS = ("rpm", "tpm", "concurrency", "budget_day", "budget_month")


@dataclass(frozen=True)
class Quota:
    """One limit as the ``RateLimit-*`` headers tell it: ``remaining`` after this request,
    ``reset_s`` until more of it is free."""

    label: str
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(max(0, self.remaining)),
                "RateLimit-Reset": str(max(0, self.reset_s))}


@dataclass(frozen=True)
class Verdict:
    """Admitted, or refused by ``quota.label``; ``quota`` is the tightest limit either way
    (None for a key without limits)."""

    allowed: bool
    quota: Optional[Quota] = None
    retry_after_s: Optional[int] = None
    message: str = ""
    #: False when waiting cannot help (the request alone is larger than the limit).
    retriable: bool = True
    #: The task id already holds a reservation (a running task's id sent again): nothing reserved.
    duplicate: bool = False

    def to_wire(self) -> tuple:
        """Plain values: a dataclass costs Ray's pickler far more than the check itself."""
        quota = self.quota
        return (self.allowed, quota and (quota.label, quota.limit, quota.remaining, quota.reset_s),
                self.retry_after_s, self.message, self.retriable, self.duplicate)

    @classmethod
    def from_wire(cls, wire: tuple) -> "Verdict":
        allowed, quota, retry_after_s, message, retriable, duplicate = wire
        return cls(allowed, Quota(*quota) if quota else None, retry_after_s, message, retriable, duplicate)

    def headers(self) -> dict[str, str]:
        out = self.quota.headers() if self.quota is not None else {}
        if not self.allowed and self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, self.retry_after_s))
        return out


@dataclass
class _Spend:
    """Tokens charged at ``at``: the estimate until the task settles, then its real usage."""

    at: float
    tokens: int
    in_window: bool = True


@dataclass
class Reservation:
    task_id: str
    key_id: str
    tenant: str
    estimate: int
    at: float
    spend: _Spend
    period: str


@dataclass
class Usage:
    requests: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "rejections": sum(self.rejections.values()),
                "rejections_by_limit": dict(self.rejections), "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out}

    def load(self, data: dict[str, Any]) -> None:
        self.requests = int(data.get("requests", 0))
        self.rejections = {k: int(v) for k, v in data.get("rejections_by_limit", {}).items()}
        self.tokens_in, self.tokens_out = int(data.get("tokens_in", 0)), int(data.get("tokens_out", 0))


@dataclass
class _Key:
    tenant: str
    requests: deque = field(default_factory=deque)  # admission times in the window
    spends: deque = field(default_factory=deque)  # _Spend in the window
    active: set = field(default_factory=set)  # task ids holding a slot
    period: str = ""
    budget_used: int = 0
    usage: Usage = field(default_factory=Usage)
    #: The sum of ``spends`` (kept as they come and go, so a check costs no walk).
    window_tokens: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.spends and self.spends[0].at <= now - WINDOW_S:
            spend = self.spends.popleft()
            spend.in_window = False
            self.window_tokens -= spend.tokens

    def charge(self, spend: _Spend) -> None:
        self.spends.append(spend)
        self.window_tokens += spend.tokens

    def recharge(self, spend: _Spend, tokens: int) -> None:
        """A charge changed (settled or given back); outside the window it changes nothing."""
        if spend.in_window:
            self.window_tokens += tokens - spend.tokens
        spend.tokens = tokens

    def tokens_in_window(self) -> int:
        return self.window_tokens


def period_of(kind: str, now: float) -> str:
    """The calendar period (UTC) ``now`` falls in: ``2026-11-30`` or ``2026-11``."""
    day = time.gmtime(now)
    return f"{day.tm_year:04d}-{day.tm_mon:02d}" + (f"-{day.tm_mday:02d}" if kind == "day" else "")


def period_left_s(kind: str, now: float) -> int:
    """Seconds until the period ``now`` falls in ends."""
    day = time.gmtime(now)
    if kind == "day":
        end = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)) + 86400
    else:
        year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0))
    return max(1, math.ceil(end - now))


def estimate_tokens(prompt_chars: int, max_tokens: int) -> int:
    """Tokens a request may spend, before the pool has tokenized it: about four characters
    a token for the prompt (settled with the real count when the task ends)."""
    return max(1, math.ceil(prompt_chars / 4)) + max(0, max_tokens)


class LimitBook:
    def __init__(self) -> None:
        self.keys: dict[str, _Key] = {}
        self.tenants: dict[str, Usage] = {}
        self.reservations: dict[str, Reservation] = {}

    def _key(self, key_id: str, tenant: str) -> _Key:
        state = self.keys.get(key_id)
        if state is None:
            state = self.keys[key_id] = _Key(tenant)
        state.tenant = tenant
        return state

    def _tenant(self, tenant: str) -> Usage:
        usage = self.tenants.get(tenant)
        if usage is None:
            usage = self.tenants[tenant] = Usage()
        return usage

    def reserve(self, key_id: str, tenant: str, limits: KeyLimits, task_id: str, estimate: int,
                now: float) -> Verdict:
        """Admit ``task_id`` against every limit of the key, or refuse naming the limit that
        frees up last (its Retry-After then covers the others too)."""
        if task_id in self.reservations:
            return Verdict(False, message=f"task_id '{task_id}' is already in use", duplicate=True)
        state = self._key(key_id, tenant)
        state.expire(now)
        period_kind = limits.budget_period or "month"
        period = period_of(period_kind, now)
        if state.period != period:
            state.period, state.budget_used = period, 0
        quotas, refusals = self._check(state, limits, estimate, now, period_kind)
        if refusals:
            quota, retry, message, retriable = _last_to_free(refusals)
            state.usage.rejections[quota.label] = state.usage.rejections.get(quota.label, 0) + 1
            tenant_usage = self._tenant(tenant)
            tenant_usage.rejections[quota.label] = tenant_usage.rejections.get(quota.label, 0) + 1
            return Verdict(False, quota, retry, message, retriable)
        spend = _Spend(now, estimate)
        state.requests.append(now)
        state.charge(spend)
        state.active.add(task_id)
        state.budget_used += estimate
        state.usage.requests += 1
        self._tenant(tenant).requests += 1
        self.reservations[task_id] = Reservation(task_id, key_id, tenant, estimate, now, spend, state.period)
        tightest = min(quotas, key=lambda q: (q.remaining / q.limit, q.label)) if quotas else None
        return Verdict(True, tightest)

    def _check(self, state: _Key, limits: KeyLimits, estimate: int, now: float,
               period_kind: str) -> tuple[list[Quota], list[tuple[Quota, int, str, bool]]]:
        """Each configured limit as it would stand after this request, and the refusals."""
        quotas: list[Quota] = []
        refusals: list[tuple[Quota, int, str, bool]] = []
        if limits.rpm is not None:
            used = len(state.requests)
            reset = math.ceil(state.requests[0] + WINDOW_S - now) if state.requests else 0
            if used + 1 > limits.rpm:
                refusals.append((Quota("rpm", limits.rpm, 0, reset), reset,
                                 f"this key may send {limits.rpm} requests a minute", True))
            else:
                quotas.append(Quota("rpm", limits.rpm, limits.rpm - used - 1, reset or math.ceil(WINDOW_S)))
        if limits.tpm is not None:
            quotas_tpm, refusal = _tpm(state, limits.tpm, estimate, now)
            if refusal is not None:
                refusals.append(refusal)
            else:
                quotas.append(quotas_tpm)
        if limits.max_concurrent is not None:
            running = len(state.active)
            if running + 1 > limits.max_concurrent:
                refusals.append((Quota("concurrency", limits.max_concurrent, 0, 1), 1,
                                 f"this key may have {limits.max_concurrent} tasks queued or running at once", True))
            else:
                quotas.append(Quota("concurrency", limits.max_concurrent, limits.max_concurrent - running - 1, 0))
        if limits.budget_tokens is not None:
            budget, label = limits.budget_tokens, f"budget_{period_kind}"
            left_s = period_left_s(period_kind, now)
            if state.budget_used + estimate > budget:
                fits = estimate <= budget
                refusals.append((Quota(label, budget, budget - state.budget_used, left_s), left_s,
                                 f"this key's budget of {budget} tokens a {period_kind} is spent "
                                 f"({state.budget_used} used, this request may need {estimate})"
                                 + ("" if fits else "; lower max_tokens"), fits))
            else:
                quotas.append(Quota(label, budget, budget - state.budget_used - estimate, left_s))
        return quotas, refusals

    def settle(self, task_id: str, tokens_in: int, tokens_out: int, now: float) -> bool:
        """The task ended: its slot is free and its tokens are its real usage (the
        difference from the estimate is refunded or charged). False: nothing reserved."""
        reservation = self.reservations.pop(task_id, None)
        if reservation is None:
            return False
        real = max(0, tokens_in) + max(0, tokens_out)
        state = self.keys.get(reservation.key_id)
        if state is not None:
            state.active.discard(task_id)
            state.recharge(reservation.spend, real)
            if state.period == reservation.period:
                state.budget_used = max(0, state.budget_used + real - reservation.estimate)
            state.usage.tokens_in += max(0, tokens_in)
            state.usage.tokens_out += max(0, tokens_out)
        tenant = self._tenant(reservation.tenant)
        tenant.tokens_in += max(0, tokens_in)
        tenant.tokens_out += max(0, tokens_out)
        return True

    def release(self, task_id: str, now: float, refused_by: Optional[str] = None) -> bool:
        """The task was never admitted after all (placement or the pool refused it): every
        limit gets back what it reserved; ``refused_by`` counts the refusal in usage."""
        reservation = self.reservations.pop(task_id, None)
        if reservation is None:
            return False
        state = self.keys.get(reservation.key_id)
        tenant = self._tenant(reservation.tenant)
        tenant.requests = max(0, tenant.requests - 1)
        if state is None:
            return True
        state.active.discard(task_id)
        _remove(state.requests, reservation.at)
        state.recharge(reservation.spend, 0)
        if state.period == reservation.period:
            state.budget_used = max(0, state.budget_used - reservation.estimate)
        state.usage.requests = max(0, state.usage.requests - 1)
        if refused_by:
            for usage in (state.usage, tenant):
                usage.rejections[refused_by] = usage.rejections.get(refused_by, 0) + 1
        return True

    def reap(self, task_id: str) -> bool:
        """A task whose end was never reported (its pool was lost): its slot is freed, its
        estimate stays charged."""
        reservation = self.reservations.pop(task_id, None)
        if reservation is None:
            return False
        state = self.keys.get(reservation.key_id)
        if state is not None:
            state.active.discard(task_id)
        return True

    def older_than(self, age_s: float, now: float) -> list[str]:
        return [r.task_id for r in self.reservations.values() if now - r.at > age_s]

    def usage(self, key_id: str, limits: Optional[KeyLimits], now: float) -> Optional[dict[str, Any]]:
        """A key's totals and where its limits stand now; None for a key never seen."""
        state = self.keys.get(key_id)
        if state is None:
            return None
        state.expire(now)
        body = dict(state.usage.to_dict(), key_id=key_id, tenant=state.tenant, active_tasks=len(state.active),
                    requests_last_minute=len(state.requests), tokens_last_minute=state.tokens_in_window())
        kind = (limits.budget_period if limits else None) or "month"
        body["budget_period"] = period_of(kind, now)
        body["budget_used"] = state.budget_used if state.period == period_of(kind, now) else 0
        body["tenant_usage"] = self._tenant(state.tenant).to_dict()
        return body

    def tenant_totals(self) -> dict[str, dict[str, Any]]:
        return {tenant: usage.to_dict() for tenant, usage in self.tenants.items()}

    # -- what survives a restart: totals and budgets, not windows or slots -----------------
    def dump(self) -> dict[str, Any]:
        return {"keys": {key_id: {"tenant": s.tenant, "period": s.period, "budget_used": s.budget_used,
                                  "usage": s.usage.to_dict()} for key_id, s in self.keys.items()},
                "tenants": self.tenant_totals()}

    def load(self, data: dict[str, Any]) -> None:
        for key_id, saved in data.get("keys", {}).items():
            state = self._key(key_id, saved.get("tenant", "default"))
            state.period, state.budget_used = saved.get("period", ""), int(saved.get("budget_used", 0))
            state.usage.load(saved.get("usage", {}))
        for tenant, saved in data.get("tenants", {}).items():
            self._tenant(tenant).load(saved)


def _tpm(state: _Key, tpm: int, estimate: int, now: float) -> tuple[Quota, Optional[tuple[Quota, int, str, bool]]]:
    used = state.tokens_in_window()
    reset = math.ceil(state.spends[0].at + WINDOW_S - now) if state.spends else math.ceil(WINDOW_S)
    if used + estimate <= tpm:
        return Quota("tpm", tpm, tpm - used - estimate, reset), None
    if estimate > tpm:
        return Quota("tpm", tpm, tpm - used, reset), (
            Quota("tpm", tpm, max(0, tpm - used), reset), math.ceil(WINDOW_S),
            f"this request may need {estimate} tokens (prompt + max_tokens), more than this key's {tpm} "
            "tokens a minute; lower max_tokens", False)
    freed, retry = 0, math.ceil(WINDOW_S)
    for spend in state.spends:  # oldest first: when enough has left the window
        freed += spend.tokens
        if used - freed + estimate <= tpm:
            retry = max(1, math.ceil(spend.at + WINDOW_S - now))
            break
    return Quota("tpm", tpm, 0, retry), (Quota("tpm", tpm, max(0, tpm - used), retry), retry,
                                         f"this key may spend {tpm} tokens a minute ({used} spent in the last "
                                         f"minute, this request may need {estimate})", True)


def _last_to_free(refusals: list[tuple[Quota, int, str, bool]]) -> tuple[Quota, int, str, bool]:
    """The refusal that lasts longest: a client retrying after it passes the others too (a
    refusal waiting cannot cure comes first)."""
    return max(refusals, key=lambda r: (not r[3], r[1]))


def _remove(times: deque, at: float) -> None:
    try:
        times.remove(at)
    except ValueError:  # already out of the window
        pass
