"""The engine contract, without a model: round-robin steps, per-session order, bounded queue, cancel, deadline."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streaming_llm.serving.jobs import Done, Engine, EngineStopped, Job, JobCancelled, JobTimeout, QueueFull


def steps(name: str, n: int, log: list, gate: threading.Event | None = None):
    def work():
        for i in range(n):
            if gate is not None:
                gate.wait(5)
                time.sleep(0.005)  # a "token" takes a while
            log.append((name, i))
            yield i
        yield Done({"steps": n}, name)

    return work


async def collect(ticket) -> list:
    return [item async for item in ticket.events()]


def test_sessions_interleave_step_by_step_and_one_session_keeps_its_order():
    async def main():
        engine, log = Engine(max_queue=8), []
        tickets = [engine.submit(Job("a", steps("a1", 3, log))), engine.submit(Job("b", steps("b", 3, log))),
                   engine.submit(Job("a", steps("a2", 2, log)))]  # fmt: skip
        results = await asyncio.gather(*(collect(t) for t in tickets))
        engine.shutdown()
        return log, results

    log, results = asyncio.run(main())
    assert [r[-1].usage["steps"] for r in results] == [3, 3, 2]
    order = [name for name, _ in log]
    assert order[:2] == ["a1", "b"]  # different sessions alternate
    assert max(i for i, n in enumerate(order) if n == "a1") < min(i for i, n in enumerate(order) if n == "a2")


def test_a_full_queue_refuses_and_cancel_and_deadline_end_jobs():
    async def main():
        engine, log, gate = Engine(max_queue=2), [], threading.Event()
        slow = engine.submit(Job("s", steps("slow", 1000, log, gate)))
        late = engine.submit(Job("t", steps("late", 1000, log, gate), deadline=time.monotonic() + 0.2))
        with pytest.raises(QueueFull):
            engine.submit(Job("u", steps("u", 1, log)))
        gate.set()
        await asyncio.sleep(0.05)
        slow.cancel("client disconnected")
        ends = [(await collect(slow))[-1], (await collect(late))[-1]]
        assert engine.load == 0
        engine.shutdown()
        with pytest.raises(EngineStopped):
            engine.submit(Job("v", steps("v", 1, log)))
        return ends

    cancelled, timed_out = asyncio.run(main())
    assert isinstance(cancelled, JobCancelled) and "client disconnected" in str(cancelled)
    assert isinstance(timed_out, JobTimeout)
