"""DecodeBudget: all-or-nothing grants in arrival order, refusals beyond the whole budget,
cancelled waits leave nothing behind, and images give their share back when freed."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest

from daemon.errors import ResourceExhausted
from daemon.processing.budget import DecodeBudget


def test_a_request_larger_than_the_whole_budget_is_refused_at_once():
    budget = DecodeBudget(1000)
    with pytest.raises(ResourceExhausted, match=r"this request needs 0\.0 MiB .* --max-decode-bytes"):
        asyncio.run(budget.acquire(1001, "this request"))
    assert budget.in_use == 0 and budget.waiting == 0


def test_waiters_are_granted_in_arrival_order_and_all_or_nothing():
    async def scenario():
        budget = DecodeBudget(100)
        order: list[str] = []
        await budget.acquire(60, "first")

        async def take(name: str, n: int):
            await budget.acquire(n, name)
            order.append(name)

        big = asyncio.ensure_future(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 10))  # would fit now, but must not overtake "big"
        await asyncio.sleep(0)
        assert order == [] and budget.waiting == 2 and budget.in_use == 60
        budget.release(60)
        await asyncio.wait_for(asyncio.gather(big, small), 10)
        assert order == ["big", "small"] and budget.in_use == 90

    asyncio.run(scenario())


def test_a_cancelled_wait_takes_nothing_and_unblocks_those_behind_it():
    async def scenario():
        budget = DecodeBudget(100)
        await budget.acquire(50, "holder")
        blocked = asyncio.ensure_future(budget.acquire(100, "blocked"))
        behind = asyncio.ensure_future(budget.acquire(50, "behind"))
        await asyncio.sleep(0)
        assert budget.waiting == 2
        blocked.cancel()  # as gRPC does when the client's deadline passes
        await asyncio.wait_for(behind, 10)
        assert blocked.cancelled() and budget.waiting == 0 and budget.in_use == 100

    asyncio.run(scenario())


def test_a_wait_honours_a_deadline():
    async def scenario():
        budget = DecodeBudget(10)
        await budget.acquire(10, "holder")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(budget.acquire(5, "late"), 0.05)
        assert budget.waiting == 0 and budget.in_use == 10

    asyncio.run(scenario())


def test_images_give_their_share_back_when_freed_or_released_from_any_thread():
    async def scenario():
        budget = DecodeBudget(100)
        await budget.acquire(100, "two images")
        a, b = np.zeros(10, np.uint8), np.zeros(10, np.uint8)
        budget.hold(a, 40)
        budget.hold(b, 60)
        waiter = asyncio.ensure_future(budget.acquire(40, "next"))
        await asyncio.sleep(0)
        threading.Thread(target=budget.release_image, args=(a,)).start()  # a slot thread, after preprocessing
        await asyncio.wait_for(waiter, 10)
        budget.release_image(a)  # twice is harmless
        assert budget.in_use == 100
        del b
        gc.collect()
        assert budget.in_use == 40

    asyncio.run(scenario())
