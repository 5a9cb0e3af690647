"""Per-key limits (orch/core/limits.py): sliding windows, token settlement, slots, budgets."""

from __future__ import annotations

import calendar

from orch.api.keys import KeyLimits
from orch.api.tasks import EmbeddingRequest, TaskRequest
from orch.core.limits import LimitBook, estimate_tokens, period_left_s, period_of
from orch.serve.limits import RateLimited, task_estimate

T0 = calendar.timegm((2026, 11, 30, 12, 0, 0))


def reserve(book: LimitBook, limits: KeyLimits, task_id: str, estimate: int = 10, at: float = T0, key: str = "k1"):
    return book.reserve(key, "acme", limits, task_id, estimate, at)


def test_rpm_is_a_sliding_minute():
    book, limits = LimitBook(), KeyLimits(rpm=3)
    for i, at in enumerate((T0, T0 + 10, T0 + 20)):
        verdict = reserve(book, limits, f"t{i}", at=at)
        assert verdict.allowed and verdict.quota.label == "rpm" and verdict.quota.remaining == 2 - i
    refused = reserve(book, limits, "t3", at=T0 + 30)
    assert not refused.allowed and refused.quota.label == "rpm"
    assert refused.retry_after_s == 30  # the first admission leaves the window at T0 + 60
    assert refused.headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "30",
                                 "Retry-After": "30"}
    assert not reserve(book, limits, "t4", at=T0 + 59.9).allowed
    assert reserve(book, limits, "t5", at=T0 + 60).allowed
    assert book.usage("k1", limits, T0 + 60)["rejections_by_limit"] == {"rpm": 2}


def test_tpm_reserves_the_estimate_and_settles_the_real_usage():
    book, limits = LimitBook(), KeyLimits(tpm=100)
    assert reserve(book, limits, "a", estimate=60).quota.remaining == 40
    refused = reserve(book, limits, "b", estimate=60, at=T0 + 5)
    assert not refused.allowed and refused.quota.label == "tpm" and refused.retriable
    assert refused.retry_after_s == 55  # when "a" leaves the window
    assert book.settle("a", tokens_in=4, tokens_out=6, now=T0 + 6)  # 10 real: 50 refunded
    assert reserve(book, limits, "b", estimate=60, at=T0 + 7).allowed
    assert book.usage("k1", limits, T0 + 7)["tokens_last_minute"] == 70
    # a task that spends more than its estimate is charged the difference
    assert book.settle("b", tokens_in=50, tokens_out=40, now=T0 + 8)
    assert book.usage("k1", limits, T0 + 8)["tokens_last_minute"] == 100
    assert not reserve(book, limits, "c", estimate=1, at=T0 + 9).allowed
    assert book.usage("k1", limits, T0 + 66)["tokens_last_minute"] == 90  # "a" left the window
    assert reserve(book, limits, "c", estimate=10, at=T0 + 66).allowed
    assert book.settle("c", 500, 0, T0 + 130)  # settled after its minute: the window is not charged
    assert book.usage("k1", limits, T0 + 130)["tokens_last_minute"] == 0


def test_a_request_larger_than_the_tpm_is_not_retriable():
    refused = reserve(LimitBook(), KeyLimits(tpm=100), "a", estimate=101)
    assert not refused.allowed and not refused.retriable and "lower max_tokens" in refused.message


def test_concurrency_slot_is_freed_by_settle_release_and_reap():
    book, limits = LimitBook(), KeyLimits(max_concurrent=1)
    assert reserve(book, limits, "a").allowed
    refused = reserve(book, limits, "b", at=T0 + 1)
    assert not refused.allowed and refused.quota.label == "concurrency" and refused.retry_after_s == 1
    book.settle("a", 1, 1, T0 + 2)  # ended (done, error or cancel: the pool settles them all)
    assert reserve(book, limits, "b", at=T0 + 3).allowed
    book.release("b", T0 + 4, refused_by="ADMISSION_REJECT")  # the pool refused it after all
    assert reserve(book, limits, "c", at=T0 + 5).allowed
    assert book.older_than(60, T0 + 70) == ["c"]
    assert book.reap("c")  # its pool was lost: nobody will settle it
    assert reserve(book, limits, "d", at=T0 + 71).allowed
    assert not book.settle("c", 1, 1, T0 + 72)  # settled once at most


def test_release_gives_back_the_request_and_counts_the_refusal():
    book, limits = LimitBook(), KeyLimits(rpm=1, budget_tokens=100, budget_period="day")
    assert reserve(book, limits, "a", estimate=50).allowed
    book.release("a", T0 + 1, refused_by="POOL_UNREADY")
    assert reserve(book, limits, "b", estimate=100, at=T0 + 2).allowed  # rpm slot and budget both back
    usage = book.usage("k1", limits, T0 + 2)
    assert usage["requests"] == 1 and usage["rejections_by_limit"] == {"POOL_UNREADY": 1}
    assert usage["budget_used"] == 100
    assert book.tenant_totals()["acme"]["requests"] == 1


def test_daily_budget_rolls_over_at_utc_midnight():
    book, limits = LimitBook(), KeyLimits(budget_tokens=100, budget_period="day")
    late = calendar.timegm((2026, 11, 30, 23, 59, 50))
    assert reserve(book, limits, "a", estimate=90, at=late).allowed
    refused = reserve(book, limits, "b", estimate=20, at=late + 1)
    assert not refused.allowed and refused.quota.label == "budget_day"
    assert refused.retry_after_s == 9 and refused.quota.remaining == 10
    book.settle("a", 5, 5, late + 2)  # real usage 10: 80 back
    assert reserve(book, limits, "b", estimate=20, at=late + 3).allowed
    assert reserve(book, limits, "c", estimate=100, at=late + 11).allowed  # a new day, a full budget
    assert book.usage("k1", limits, late + 11)["budget_period"] == "2026-12-01"


def test_monthly_budget_period_and_reset():
    limits = KeyLimits(budget_tokens=10, budget_period="month")
    at = calendar.timegm((2026, 12, 31, 0, 0, 0))
    assert period_of("month", at) == "2026-12" and period_of("day", at) == "2026-12-31"
    assert period_left_s("month", at) == 86400 and period_left_s("day", at) == 86400
    book = LimitBook()
    assert reserve(book, limits, "a", estimate=10, at=at).allowed
    refused = reserve(book, limits, "b", estimate=1, at=at + 1)
    assert refused.quota.label == "budget_month" and refused.retry_after_s == 86399
    assert reserve(book, limits, "b", estimate=1, at=at + 86400).allowed  # January


def test_the_tightest_limit_goes_in_the_headers():
    book = LimitBook()
    verdict = reserve(book, KeyLimits(rpm=100, tpm=50), "a", estimate=40)
    assert verdict.quota.label == "tpm" and verdict.headers()["RateLimit-Remaining"] == "10"
    assert "Retry-After" not in verdict.headers()
    assert reserve(book, KeyLimits(), "b", key="k2").quota is None  # no limits: metered only


def test_refusal_names_the_limit_that_frees_last():
    book, limits = LimitBook(), KeyLimits(rpm=1, budget_tokens=10, budget_period="day")
    assert reserve(book, limits, "a", estimate=10).allowed
    refused = reserve(book, limits, "b", estimate=5, at=T0 + 1)
    assert refused.quota.label == "budget_day"  # waiting a minute would not be enough
    assert refused.from_wire(refused.to_wire()) == refused
    error = RateLimited(refused)
    assert error.http_status == 429 and error.policy_label == "budget_day"
    assert error.retry_after_ms == refused.retry_after_s * 1000
    assert error.headers["Retry-After"] == str(refused.retry_after_s)


def test_a_task_id_in_use_reserves_nothing():
    book, limits = LimitBook(), KeyLimits(max_concurrent=5)
    assert reserve(book, limits, "a").allowed
    again = reserve(book, limits, "a", at=T0 + 1)
    assert again.duplicate and not again.allowed
    assert book.usage("k1", limits, T0 + 1)["active_tasks"] == 1


def test_totals_and_budgets_survive_a_restart():
    book, limits = LimitBook(), KeyLimits(budget_tokens=100, budget_period="day")
    assert reserve(book, limits, "a", estimate=30).allowed
    book.settle("a", 7, 13, T0 + 1)
    assert not reserve(book, limits, "b", estimate=90, at=T0 + 2).allowed
    restored = LimitBook()
    restored.load(book.dump())
    usage = restored.usage("k1", limits, T0 + 3)
    assert (usage["requests"], usage["tokens_in"], usage["tokens_out"], usage["budget_used"]) == (1, 7, 13, 20)
    assert usage["rejections_by_limit"] == {"budget_day": 1}
    assert restored.tenant_totals()["acme"]["tokens_out"] == 13
    assert not reserve(restored, limits, "b", estimate=90, at=T0 + 4).allowed


def test_estimates():
    assert estimate_tokens(400, 16) == 116
    assert task_estimate(TaskRequest(prompt="x" * 40, max_tokens=8)) == 18
    assert task_estimate(EmbeddingRequest(inputs=["abcd", "efgh"])) == 2


def test_the_reaper_frees_only_slots_no_pool_holds():
    """A pool lost with its tasks never settles them: the ingress's reaper asks the pools and
    frees what none holds, and keeps what a pool holds or could not answer for."""
    import asyncio

    from orch.config import parse_config
    from orch.serve.limits import TenantLimits
    from orch.serve.pool_client import PoolNotRunning, unavailable
    from tests.conftest import home_config

    book, limits = LimitBook(), KeyLimits(max_concurrent=4)
    for task_id in ("kept", "lost", "restarted", "unsure"):
        assert reserve(book, limits, task_id).allowed

    class Pools:
        async def has_task(self, pool_id: str, task_id: str) -> bool:
            if task_id == "restarted":
                raise PoolNotRunning(pool_id)
            if task_id == "unsure":
                raise unavailable(pool_id, "did not answer within 5 s")
            return task_id == "kept"

    class Limiter:  # the limiter actor's two calls the reaper makes, over the book
        async def call(self, method: str, *args):
            if method == "claim_stale":
                return book.older_than(60, T0 + 61)
            assert method == "reap"
            return sum(book.reap(task_id) for task_id in args[0])

    tenant_limits = TenantLimits(parse_config(home_config()), Pools())
    tenant_limits._client = Limiter()
    assert asyncio.run(tenant_limits.reap_once()) == 2
    assert sorted(book.reservations) == ["kept", "unsure"]
    assert book.usage("k1", limits, T0 + 62)["active_tasks"] == 2


def test_undeclared_tenants_are_counted_as_other():
    from orch.config import parse_config
    from orch.serve.limits import TenantLimits, by_label
    from orch.serve.pool_client import PoolClient
    from tests.conftest import home_config

    config = home_config()
    config["tenants"] = {"declared": [{"id": "acme"}]}
    label = TenantLimits(parse_config(config), PoolClient("ns")).tenant_label
    book = LimitBook()
    for tenant, task_id in (("acme", "a"), ("gone-1", "b"), ("gone-2", "c")):
        assert book.reserve(f"key-{task_id}", tenant, KeyLimits(rpm=1), task_id, 5, T0).allowed
        book.settle(task_id, 2, 3, T0 + 1)
    book.reserve("key-b", "gone-1", KeyLimits(rpm=1), "d", 5, T0 + 2)
    totals = by_label(book.tenant_totals(), label)
    assert sorted(totals) == ["acme", "other"]
    assert totals["other"]["requests"] == 2 and totals["other"]["tokens_out"] == 6
    assert totals["other"]["rejections_by_limit"] == {"rpm": 1}
