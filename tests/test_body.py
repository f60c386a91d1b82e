"""A relayed request's body bounded in time, on virtual time: exact deadlines, no sleeping."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trioproxy.body import BodyGuard, BodyRefused

CHUNKED = [(b"transfer-encoding", b"chunked")]


def piece(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_each_piece_of_a_body_gets_the_idle_timeout_then_a_stall_is_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, receive = trio.open_memory_channel[dict[str, Any]](10)
    guard = BodyGuard(receive.receive, max_size=None, idle_timeout=60)
    assert not guard.declared_too_large(CHUNKED)
    began = trio.current_time()

    async def trickle() -> None:
        for data in (b"a", b"b"):
            await trio.sleep(59)
            await client.send(piece(data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        assert (await guard())["body"] == b"a"
        assert trio.current_time() - began == pytest.approx(59)
        assert (await guard())["body"] == b"b"
        with pytest.raises(BodyRefused):
            await guard()
    assert trio.current_time() - began == pytest.approx(59 + 59 + 60)
    assert guard.failure == (408, "The request body stalled for 60 s.")
    assert guard.received == 2


async def test_once_the_body_is_complete_reads_are_not_timed(autojump_clock: trio.testing.MockClock) -> None:
    client, receive = trio.open_memory_channel[dict[str, Any]](10)
    guard = BodyGuard(receive.receive, max_size=None, idle_timeout=60)
    guard.declared_too_large(CHUNKED)
    await client.send(piece(b"all", more=False))
    assert (await guard())["body"] == b"all" and guard.complete
    began = trio.current_time()

    async def disconnect_later() -> None:
        await trio.sleep(3600)  # a long download: the relay watches for a disconnect all along
        await client.send({"type": "http.disconnect"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disconnect_later)
        assert (await guard())["type"] == "http.disconnect"
    assert trio.current_time() - began == pytest.approx(3600)
    assert guard.failure is None
