"""Sessions: turn limits and budgets per conversation, as metadata only (never content).

A session is created by the first task that names its ``session_id`` and passes the
session checks (before it is placed, so a turn that finishes faster than its admission is
recorded is never lost), and lives ``ttl_s`` after its last activity: a turn admitted or a
turn finished both refresh it, so a long generation never expires the session it belongs
to, while a refused request does not (a session that is out of budget still expires on
time). An expired or deleted session is
gone; its id starts a fresh session with fresh budgets.

Limits, checked before a task is queued:

- turns: at most ``max_turns`` admitted tasks per session;
- tokens: ``tokens_in + tokens_out`` used;
- time: ``decode_time_ms`` used;
- cost: tokens priced per 1k in and per 1k out.

A request is refused when a budget is already spent, or when its own upper bound would
exceed what is left: ``max_tokens`` for tokens and cost (its prompt is counted when the
turn finishes, since only the pool's tokenizer knows its size), ``deadline_ms`` for time
(a request without a deadline is only refused once the time budget is spent). Usage is
recorded from each task's finish summary, failed and cancelled tasks included. Budgets are
checked against usage recorded so far, so a session that runs turns in parallel can
overrun by what those turns use.

KV cache: the cache belongs to the pool's engine, not to the session. A turn that lands on
the pool of the turn before (``kv_warmth``: session affinity held) can find its earlier
turns still in the slot's prompt-prefix cache, unless another task used that slot in
between; nothing here tracks that, so ``kv_bytes`` is 0.

Every method takes ids and numbers, nothing else, so no prompt, message or output can be
stored here. No Ray import: the ``orch-sessions`` actor wraps one ``SessionBook``.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from orch.api.errors import ErrorCode
from orch.api.tasks import ID_PATTERN
from orch.core.errors import OrchError

#: Sessions kept at most; past it the least recently active (expired ones first) go.
MAX_SESSIONS = 100_000
#: ``policy_label`` of a refusal, so clients can tell it from queue backpressure.
POLICY_LABEL = "session_budget"

_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class SessionPolicy:
    ttl_s: float = 600.0
    max_turns: int = 8
    #: Budgets per session; None: not limited.
    tokens: Optional[int] = None
    time_ms: Optional[int] = None
    cost: Optional[float] = None
    cost_per_1k_tokens_in: float = 0.0
    cost_per_1k_tokens_out: float = 0.0
    max_sessions: int = MAX_SESSIONS

    @property
    def has_budgets(self) -> bool:
        return self.tokens is not None or self.time_ms is not None or self.cost is not None

    def cost_of(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in * self.cost_per_1k_tokens_in / 1000 + tokens_out * self.cost_per_1k_tokens_out / 1000


@dataclass(frozen=True)
class TurnCheck:
    """The answer to "may this session take another turn?", as plain data so it crosses to
    the ingress as it is: either the turn's context, or why it is refused."""

    #: The pool that served the session's last turn (affinity); None for a new session.
    last_pool_id: Optional[str] = None
    #: What the session may still spend; None without budgets.
    budgets: Optional[dict[str, Any]] = None
    #: Why the turn is refused (what to do instead); None when it may go ahead.
    refusal: Optional[str] = None
    #: Until the refused session expires (its budgets start afresh); None for a new session.
    retry_after_ms: Optional[int] = None

    def error(self) -> Optional[OrchError]:
        """The BUDGET_EXCEEDED refusal to answer with, or None when the turn may go ahead."""
        if self.refusal is None:
            return None
        return OrchError(ErrorCode.BUDGET_EXCEEDED, self.refusal, retriable=False,
                         retry_after_ms=self.retry_after_ms, policy_label=POLICY_LABEL)


@dataclass(slots=True)
class _Session:
    last_active: float
    turns: int = 0
    tokens_used: int = 0
    time_used_ms: int = 0
    cost_used: float = 0.0
    last_pool_id: Optional[str] = None
    kv_warmth: bool = False


class SessionBook:
    """Every live session of one orchestrator, least recently active first."""

    def __init__(self, policy: SessionPolicy = SessionPolicy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def configure(self, policy: SessionPolicy) -> None:
        """Apply a new policy; live sessions keep their usage and are measured against it."""
        self.policy = policy
        self.sweep()

    # -- admission -----------------------------------------------------------------------
    def check(self, session_id: str, *, max_tokens: int = 0, deadline_ms: Optional[int] = None) -> Optional[str]:
        """May this session start another turn? Raises OrchError BUDGET_EXCEEDED if not;
        returns the pool that served its last turn (for affinity), None for a new session,
        which this creates."""
        turn = self.check_turn(session_id, max_tokens=max_tokens, deadline_ms=deadline_ms)
        error = turn.error()
        if error is not None:
            raise error
        return turn.last_pool_id

    def check_turn(self, session_id: str, *, max_tokens: int = 0, deadline_ms: Optional[int] = None) -> TurnCheck:
        """``check`` answered rather than raised, with the budgets the turn may still use."""
        _require_id(session_id, "session_id")
        max_tokens = _require_count(max_tokens, "max_tokens")
        if deadline_ms is not None:
            deadline_ms = _require_count(deadline_ms, "deadline_ms")
        session = self._live(session_id)
        usage = session or _Session(last_active=self._clock())
        refusal = self._refusal(session_id, usage, max_tokens, deadline_ms)
        if refusal is not None:
            return TurnCheck(refusal=refusal, retry_after_ms=self._ttl_ms_remaining(session) if session else None)
        if session is None:
            self._create(session_id)
        return TurnCheck(session.last_pool_id if session else None, self.budgets_left(session_id))

    def budgets_left(self, session_id: str) -> Optional[dict[str, Any]]:
        """What the session may still spend (a new session: everything); None without budgets."""
        if not self.policy.has_budgets:
            return None
        session = self._live(session_id)
        return self._remaining(session or _Session(last_active=self._clock()))

    def _refusal(self, session_id: str, usage: _Session, max_tokens: int, deadline_ms: Optional[int]) -> Optional[str]:
        policy = self.policy
        name = f"session '{session_id}'"
        fresh = "start a new session (another session_id), or delete this one to begin again"
        if usage.turns >= policy.max_turns:
            return f"{name} has used all {policy.max_turns} of its turns (sessions.max_turns); {fresh}"
        if policy.tokens is not None:
            left = max(0, policy.tokens - usage.tokens_used)
            if left == 0:
                return f"{name} has used its token budget ({policy.tokens} tokens, 0 left); {fresh}"
            if max_tokens > left:
                return (f"{name} has {left} of its {policy.tokens} budget tokens left, and this request may use up "
                        f"to {max_tokens} (max_tokens) plus its prompt; lower max_tokens to at most {left}, or {fresh}")
        if policy.time_ms is not None:
            left = max(0, policy.time_ms - usage.time_used_ms)
            if left == 0:
                return f"{name} has used its decode-time budget ({policy.time_ms} ms, 0 ms left); {fresh}"
            if deadline_ms is not None and deadline_ms > left:
                return (f"{name} has {left} ms of its {policy.time_ms} ms decode-time budget left, and this "
                        f"request's deadline_ms {deadline_ms} allows more; lower deadline_ms to at most {left}, "
                        f"or {fresh}")
        if policy.cost is not None:
            left_cost = max(0.0, policy.cost - usage.cost_used)
            if left_cost <= 1e-12:
                return f"{name} has spent its cost budget ({policy.cost:g}, 0 left); {fresh}"
            bound = policy.cost_of(0, max_tokens)
            if bound > left_cost + 1e-12:
                fits = math.floor(left_cost * 1000 / policy.cost_per_1k_tokens_out + 1e-9)
                return (f"{name} has {left_cost:.6g} of its {policy.cost:g} cost budget left, and this request's "
                        f"max_tokens {max_tokens} may cost up to {bound:.6g} "
                        f"({policy.cost_per_1k_tokens_out:g} per 1k output tokens, plus its prompt); lower "
                        f"max_tokens to at most {fits}, or {fresh}")
        return None

    # -- records -------------------------------------------------------------------------
    def record_turn(self, session_id: str, pool_id: str) -> None:
        """A task of this session was queued on ``pool_id``."""
        _require_id(session_id, "session_id")
        _require_id(pool_id, "pool_id")
        session = self._live(session_id)
        if session is None:
            session = self._create(session_id)
        session.turns += 1
        session.kv_warmth = session.last_pool_id == pool_id
        session.last_pool_id = pool_id
        self._touch(session_id, session)

    def record_usage(self, session_id: str, *, tokens_in: int, tokens_out: int, decode_time_ms: int) -> bool:
        """A task of this session finished (however it ended); False if the session is gone."""
        _require_id(session_id, "session_id")
        tokens_in = _require_count(tokens_in, "tokens_in")
        tokens_out = _require_count(tokens_out, "tokens_out")
        decode_time_ms = _require_count(decode_time_ms, "decode_time_ms")
        session = self._live(session_id)
        if session is None:
            return False
        session.tokens_used += tokens_in + tokens_out
        session.time_used_ms += decode_time_ms
        session.cost_used += self.policy.cost_of(tokens_in, tokens_out)
        self._touch(session_id, session)
        return True

    # -- reads and removal ---------------------------------------------------------------
    def info(self, session_id: str) -> Optional[dict[str, Any]]:
        """The session as ``GET /v2/sessions/{id}`` shows it; None if unknown or expired."""
        _require_id(session_id, "session_id")
        session = self._live(session_id)
        if session is None:
            return None
        return {
            "session_id": session_id,
            "ttl_ms_remaining": self._ttl_ms_remaining(session),
            "turns": session.turns,
            "max_turns": self.policy.max_turns,
            "kv_bytes": 0,
            "kv_warmth": session.kv_warmth,
            "last_pool_id": session.last_pool_id,
            "budgets": self._remaining(session) if self.policy.has_budgets else None,
        }

    def delete(self, session_id: str) -> bool:
        _require_id(session_id, "session_id")
        found = self._live(session_id) is not None
        self._sessions.pop(session_id, None)
        return found

    def sweep(self) -> int:
        """Forget expired sessions; cheap, since they are the oldest entries."""
        now = self._clock()
        removed = 0
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if not self._expired(session, now):
                break
            del self._sessions[session_id]
            removed += 1
        return removed

    # -- internals -----------------------------------------------------------------------
    def _remaining(self, session: _Session) -> dict[str, Any]:
        policy = self.policy
        return {
            "tokens": None if policy.tokens is None else max(0, policy.tokens - session.tokens_used),
            "time_ms": None if policy.time_ms is None else max(0, policy.time_ms - session.time_used_ms),
            "cost": None if policy.cost is None else round(max(0.0, policy.cost - session.cost_used), 9),
        }

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.last_active >= self.policy.ttl_s

    def _ttl_ms_remaining(self, session: _Session) -> int:
        return max(0, int((session.last_active + self.policy.ttl_s - self._clock()) * 1000))

    def _live(self, session_id: str) -> Optional[_Session]:
        self.sweep()
        session = self._sessions.get(session_id)
        if session is not None and self._expired(session, self._clock()):
            del self._sessions[session_id]
            return None
        return session

    def _create(self, session_id: str) -> _Session:
        while len(self._sessions) >= self.policy.max_sessions:
            self._sessions.popitem(last=False)
        session = _Session(last_active=self._clock())
        self._sessions[session_id] = session
        return session

    def _touch(self, session_id: str, session: _Session) -> None:
        session.last_active = max(session.last_active, self._clock())
        self._sessions.move_to_end(session_id)


def _require_id(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be an id string, not {type(value).__name__}")
    if not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 1-128 characters of letters, digits and . _ : - (starting with a letter or digit)")
    return value


def _require_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, not {value}")
    return value
