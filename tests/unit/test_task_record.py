"""The per-task event buffer and its cancel protocol, without Ray."""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from orch.pools.task_record import TaskRecord


def make_record() -> TaskRecord:
    record = TaskRecord(
        task_id="t", priority="interactive", prompt="p", params=None, ctx=64,
        prompt_tokens=1, queue_position=0, predicted_start_ms=0,
    )
    record.bind_loop(asyncio.get_running_loop())
    return record


def test_events_buffered_before_a_consumer_attaches():
    async def scenario():
        record = make_record()
        record.push("started", {})
        for n in range(5):
            record.push_token(f"w{n}")
        record.push("end", {"tokens_out": 5})
        events, done = await record.poll(0, 0.0)
        return events, done

    events, done = asyncio.run(scenario())
    assert done
    assert [kind for _, kind, _ in events] == ["started"] + ["token"] * 5 + ["end"]
    assert [data["i"] for _, kind, data in events if kind == "token"] == list(range(5))
    assert [index for index, _, _ in events] == list(range(7))


def test_nothing_after_terminal():
    async def scenario():
        record = make_record()
        record.push("error", {"code": "INTERNAL"})
        return record.push_token("late"), record.push("end", {}), len(record.events)

    assert asyncio.run(scenario()) == (False, False, 1)


def test_poll_waits_for_tokens_from_another_thread():
    async def scenario():
        record = make_record()

        def produce():
            for n in range(50):
                record.push_token(str(n))
            record.push("end", {})

        thread = threading.Thread(target=produce)
        seen = []
        cursor = 0
        thread.start()
        for _ in range(200):
            events, done = await record.poll(cursor, 1.0)
            seen.extend(events)
            if events:
                cursor = events[-1][0] + 1
            if done:
                break
        thread.join()
        return seen

    seen = asyncio.run(scenario())
    assert [data["t"] for _, kind, data in seen if kind == "token"] == [str(n) for n in range(50)]
    assert seen[-1][1] == "end"


def test_cancel_before_any_stream_cuts_everything_buffered():
    async def scenario():
        record = make_record()
        record.push("started", {})
        for n in range(3):
            record.push_token(str(n))
        cut = record.cut_and_end(decode_time_ms=0)
        acked = await record.wait_acknowledged(cut, 0.1)
        again = record.cut_and_end(decode_time_ms=0)
        assert again == 0  # the end is not handed out yet, so a second cancel still cuts at 0
        events, done = await record.poll(0, 0.0)
        return cut, acked, events, done, record.push_token("after")

    cut, acked, events, done, after = asyncio.run(scenario())
    assert cut == 0 and acked and done and after is False
    assert [kind for _, kind, _ in events] == ["end"]
    assert events[0][2]["tokens_out"] == 0


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(min_value=0, max_value=40),
    cancel_after=st.integers(min_value=0, max_value=45),
    consumer_pace=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=10),
)
def test_no_token_reaches_a_stream_after_cancel_returns(total, cancel_after, consumer_pace):
    """Whatever the interleaving, the consumer never writes more tokens than cancel reported."""

    async def scenario():
        record = make_record()
        written: list[tuple[int, str, dict]] = []
        cancel_returned = asyncio.Event()
        written_after_cancel: list = []

        async def consumer():
            cursor = 0
            step = 0
            while True:
                events, done = await record.poll(cursor, 0.01)
                for _ in range(consumer_pace[step % len(consumer_pace)]):
                    await asyncio.sleep(0)  # the write to the client takes a while
                step += 1
                if cancel_returned.is_set():
                    written_after_cancel.extend(e for e in events if e[1] == "token")
                written.extend(events)
                if events:
                    cursor = events[-1][0] + 1
                if done:
                    return

        async def producer():
            record.push("started", {})
            for n in range(total):
                if not record.push_token(str(n)):
                    return
                await asyncio.sleep(0)
            record.push("end", {"finish_reason": "length"})

        async def canceller():
            for _ in range(cancel_after):
                await asyncio.sleep(0)
            cut = record.cut_and_end(decode_time_ms=0)
            if cut is None:  # the stream had everything already; cancel is a no-op
                return None
            assert await record.wait_acknowledged(cut, 1.0)
            cancel_returned.set()
            return record.tokens_before(cut)

        consumer_task = asyncio.create_task(consumer())
        _, tokens_sent = await asyncio.gather(producer(), canceller())
        await asyncio.wait_for(consumer_task, 5)
        return written, tokens_sent, written_after_cancel

    written, tokens_sent, after = asyncio.run(scenario())
    tokens = [e for e in written if e[1] == "token"]
    assert after == []
    if tokens_sent is None:
        assert written[-1][2]["finish_reason"] == "length" and len(tokens) == total
    else:
        assert len(tokens) == tokens_sent
        assert written[-1][2]["finish_reason"] == "cancelled"
    assert [data["i"] for _, _, data in tokens] == list(range(len(tokens)))
    assert written[-1][1] == "end"
    assert [index for index, _, _ in written] == list(range(len(written)))


def test_cancel_after_the_end_cuts_the_unsent_tail_without_ending_the_task_twice():
    """The task ended on its own, but its stream was handed only part of it: cancel still
    cuts the rest (nothing reaches the stream after cancel returns), yet the task is not
    finalized again: one transcript, and the end keeps the first one's id."""

    async def scenario():
        record = make_record()
        finals = []

        def finalizer(rec, kind, data):
            finals.append(kind)
            return dict(data, transcript_id=f"tr-{len(finals)}")

        record.finalizer = finalizer
        record.push("started", {})
        record.push_token("a")
        handed, _ = await record.poll(0, 0.0)
        record.push_token("b")
        record.push("end", {"tokens_out": 2, "finish_reason": "length"})
        cut = record.cut_and_end(decode_time_ms=0)
        rest, done = await record.poll(len(handed), 0.0)
        return finals, cut, handed + rest, done, record

    finals, cut, events, done, record = asyncio.run(scenario())
    assert finals == ["end"] and cut == 2 and done
    assert [kind for _, kind, _ in events] == ["started", "token", "end"]
    assert events[-1][2] == {"tokens_out": 1, "decode_time_ms": 0, "finish_reason": "cancelled",
                              "transcript_id": "tr-1"}
    assert record.ended_before_cancel and record.tokens_out == 1
