"""Large binary messages leave as frame head + payload (server/wsprotocol.py)."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.frames import Frame, Opcode

from server.wsprotocol import DIRECT_MIN, frame_head
from tests.conftest import unique
from tests.support.client import SyncClient, register_login


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, DIRECT_MIN, (1 << 20) + 49])
def test_the_head_is_what_websockets_writes(size: int) -> None:
    head = frame_head(size)
    frame = Frame(Opcode.BINARY, b"x" * size).serialize(mask=False, extensions=[])
    assert frame == head + b"x" * size


def test_a_head_beyond_4_gib_has_the_64_bit_length() -> None:
    assert frame_head(1 << 32) == bytes([0x82, 127]) + (1 << 32).to_bytes(8, "big")


async def test_a_download_interleaved_with_pings_arrives_whole(server) -> None:
    """Pongs queued by websockets go out whole, before the next large frame."""
    tokens = await register_login(server.http, unique("wsdirect"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    data = os.urandom(5 * (1 << 20) + 3)
    done = await client.push([data[i : i + (4 << 20)] for i in range(0, len(data), 4 << 20)])
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    ids = [p["id"] for p in change["parts"]]

    async def pings() -> None:
        for _ in range(50):
            await asyncio.wait_for(await client.ws.ping(), 10)

    pinging = asyncio.create_task(pings())
    for _ in range(3):
        got = b"".join([await client.download(i) for i in ids])
        assert got == data
    await pinging
    await client.close()
