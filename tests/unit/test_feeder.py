"""BatchFeeder: items consumed off the loop, in order, a batch at a time."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.services.feeder import BatchFeeder


def test_items_are_consumed_in_order_off_the_loop_in_batches() -> None:
    batches: list[list[int]] = []
    threads: set[int] = set()
    release = threading.Event()

    def consume(batch: list[int]) -> None:
        threads.add(threading.get_ident())
        batches.append(batch)
        release.wait(5)  # the first batch is slow: what arrives meanwhile is one batch

    async def main() -> None:
        feeder: BatchFeeder[int] = BatchFeeder(consume)
        feeder.push(0)
        await asyncio.sleep(0.05)
        for i in range(1, 6):
            feeder.push(i)
        release.set()
        await feeder.finish()

    asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert threading.get_ident() not in threads


def test_finish_raises_what_consume_raised() -> None:
    def consume(batch: list[int]) -> None:
        raise ValueError(f"bad {batch}")

    async def main() -> None:
        feeder: BatchFeeder[int] = BatchFeeder(consume)
        feeder.push(7)
        await feeder.finish()

    with pytest.raises(ValueError, match=r"bad \[7\]"):
        asyncio.run(main())


def test_cancel_consumes_nothing_more() -> None:
    seen: list[int] = []

    async def main() -> None:
        feeder: BatchFeeder[int] = BatchFeeder(seen.extend)
        feeder.push(1)
        feeder.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen == []
