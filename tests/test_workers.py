"""workers: a pool of threads per kind of blocking work, at most a few per resource, and a health that
tells when every thread of a pool is held past its deadline."""

import asyncio
import threading

import pytest

import workers


def run(coro):
    return asyncio.run(coro)


async def _started(pool, gate, what, key=None):
    """A call of ``pool`` that blocks on ``gate``, as a task."""
    return asyncio.ensure_future(pool.run(gate.wait, what=what, key=key))


def test_a_call_runs_on_a_thread_of_its_pool_and_its_error_is_raised_here():
    pool = workers.Pool("load", 2, 10)

    async def main():
        name = await pool.run(lambda: threading.current_thread().name, what="a")
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0, what="b")
        return name

    assert run(main()) != threading.current_thread().name
    assert pool.operations() == [] and pool.busy == 0


def test_the_calls_of_one_key_take_at_most_per_key_threads_and_leave_the_rest_to_other_keys():
    pool = workers.Pool("load", 4, 10, per_key=2)
    stuck, free = threading.Event(), threading.Event()
    free.set()

    async def main():
        held = [await _started(pool, stuck, f"a{i}", key="a") for i in range(6)]
        await asyncio.sleep(0.2)
        assert pool.busy == 2  # the other four wait on the event loop, holding no thread
        assert len(pool.operations()) == 6
        # Another resource still finds threads.
        assert await asyncio.wait_for(pool.run(free.wait, what="b", key="b"), 5) is True
        stuck.set()
        await asyncio.wait_for(asyncio.gather(*held), 5)
        assert pool.busy == 0 and pool.operations() == [] and pool._keys == {}

    run(main())


def test_a_pool_is_unhealthy_only_when_every_thread_is_held_past_the_deadline():
    pool = workers.Pool("login", 2, 1.0)
    stuck = threading.Event()

    async def main():
        first = await _started(pool, stuck, "one")
        await asyncio.sleep(1.2)
        assert pool.unhealthy() is None  # one thread of two is held: the pool still serves
        second = await _started(pool, stuck, "two")
        await asyncio.sleep(0.05)
        assert pool.busy == 2 and pool.unhealthy() is None  # both held, the second not past the deadline
        await asyncio.sleep(1.1)
        reason = pool.unhealthy()
        assert reason is not None and "all 2 login workers" in reason and "1 s" in reason
        pools = workers.Pools(pool, workers.Pool("load", 1, 10))
        assert pools.unhealthy() == reason
        stuck.set()
        await asyncio.gather(first, second)
        assert pool.unhealthy() is None and pools.unhealthy() is None

    run(main())


def test_operations_list_every_call_in_progress_the_oldest_first_with_its_age():
    pools = workers.Pools(workers.Pool("load", 1, 10), workers.Pool("login", 1, 10))
    stuck = threading.Event()

    async def main():
        stream = pools.begin("stream", "models/a.bin")
        await asyncio.sleep(0.05)
        task = await _started(pools.login, stuck, "login")
        await asyncio.sleep(0.05)
        ops = pools.operations()
        assert [(o["kind"], o["what"]) for o in ops] == [("stream", "models/a.bin"), ("login", "login")]
        assert ops[0]["ageSeconds"] >= ops[1]["ageSeconds"] >= 0
        pools.end(stream)
        stuck.set()
        await task
        assert pools.operations() == []

    run(main())


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError):
        workers.Pool("load", 0, 1)


def test_a_call_waiting_for_its_resource_never_counts_as_a_stuck_thread():
    """Only calls that hold a thread count: a load of a resource whose threads are taken waits on the event
    loop, and however long it waits, the pool is not stuck while another resource's load has just begun."""
    pool = workers.Pool("load", 2, 1.0, per_key=1)
    stuck = threading.Event()

    async def main():
        held = await _started(pool, stuck, "a1", key="a")
        waiting = await _started(pool, stuck, "a2", key="a")  # no thread: a's one is taken
        await asyncio.sleep(1.2)
        fresh = await _started(pool, stuck, "b1", key="b")
        await asyncio.sleep(0.05)
        assert pool.busy == 2 and len(pool.operations()) == 3
        assert pool.unhealthy() is None  # a2 is old, but it holds no thread; b1 has just begun
        stuck.set()
        await asyncio.gather(held, waiting, fresh)

    run(main())
