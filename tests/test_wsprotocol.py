"""Large binary messages leave as frame head + payload, and large received
payloads are gathered in place (server/wsprotocol.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Generator

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from server.wsprotocol import DIRECT_MIN, FrameReader, frame_head
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


# ------------------------------------------------------------ receiving

_SIZES = [0, 1, 125, 126, 65_535, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, 200_003, 1 << 20]


def _wire(frames: list[Frame]) -> bytes:
    """Frames as a client puts them on the wire (masked)."""
    return b"".join(f.serialize(mask=True, extensions=[]) for f in frames)


def _parse(
    reader: StreamReader, pieces: list[bytes], *, eof: bool = False
) -> tuple[list[Frame], BaseException | None]:
    """Frames parsed from ``pieces`` fed one by one, as websockets' Protocol does."""
    got: list[Frame] = []

    def parser() -> Generator[None, None, None]:
        while True:
            got.append((yield from Frame.parse(reader.read_exact, mask=True, max_size=None)))

    run = parser()
    next(run)
    try:
        for piece in pieces:
            reader.feed_data(piece)
            next(run)
        if eof:
            reader.feed_eof()
            next(run)
    except EOFError as exc:
        return got, exc
    return got, None


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(_SIZES), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 22), max_size=40),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_frames_split_anywhere_parse_as_websockets_parses_them(
    sizes: list[int], cuts: list[int], seed: int
) -> None:
    rnd = random.Random(seed)
    frames = []
    for size in sizes:
        frames.append(Frame(Opcode.BINARY, rnd.randbytes(size)))
        if rnd.random() < 0.3:  # a ping between two messages
            frames.append(Frame(Opcode.PING, rnd.randbytes(4)))
    pieces = _split(_wire(frames), cuts)
    ours, error = _parse(FrameReader(), pieces)
    theirs, _ = _parse(StreamReader(), pieces)
    assert error is None
    assert [(f.opcode, bytes(f.data)) for f in ours] == [(f.opcode, f.data) for f in frames]
    assert [(f.opcode, bytes(f.data)) for f in ours] == [(f.opcode, bytes(f.data)) for f in theirs]


def test_a_payload_is_gathered_only_once_an_eighth_of_it_arrived() -> None:
    """A bare frame head must not make the server allocate the whole payload."""
    size = 1 << 20
    data = os.urandom(size)
    wire = _wire([Frame(Opcode.BINARY, data)])
    eighth = len(wire) - size + size // 8
    reader = FrameReader()
    run = Frame.parse(reader.read_exact, mask=True, max_size=None)
    next(run)
    reader.feed_data(wire[: eighth - 1])
    next(run)
    assert reader._target is None
    reader.feed_data(wire[eighth - 1 : eighth])
    next(run)
    assert reader._target is not None and len(reader._target) == size
    reader.feed_data(wire[eighth:])
    with pytest.raises(StopIteration) as done:
        next(run)
    assert done.value.value.data == data


def test_a_payload_that_arrives_whole_is_sliced_as_websockets_does() -> None:
    data = os.urandom(DIRECT_MIN * 3)
    wire = _wire([Frame(Opcode.BINARY, data), Frame(Opcode.BINARY, b"next")])
    reader = FrameReader()
    frames, _ = _parse(reader, [wire])
    assert [f.data for f in frames] == [data, b"next"]
    assert reader._target is None and not reader.buffer


@pytest.mark.parametrize("sent", [DIRECT_MIN, (1 << 20) - 1])
def test_a_stream_that_ends_mid_payload_raises_what_websockets_raises(sent: int) -> None:
    wire = _wire([Frame(Opcode.BINARY, os.urandom(1 << 20))])
    cut = len(wire) - (1 << 20) + sent
    _, ours = _parse(FrameReader(), [wire[:cut]], eof=True)
    _, theirs = _parse(StreamReader(), [wire[:cut]], eof=True)
    assert isinstance(ours, EOFError) and isinstance(theirs, EOFError)
    assert str(ours) == str(theirs) == f"stream ends after {sent} bytes, expected {1 << 20} bytes"


def test_a_parser_dropped_mid_payload_leaves_later_data_to_the_buffer() -> None:
    """websockets replaces its parser when the connection fails: nothing must keep
    writing into the abandoned payload."""
    wire = _wire([Frame(Opcode.BINARY, os.urandom(1 << 20))])
    reader = FrameReader()
    run = Frame.parse(reader.read_exact, mask=True, max_size=None)
    next(run)
    reader.feed_data(wire[: len(wire) // 2])
    next(run)
    assert reader._target is not None
    run.close()
    assert reader._target is None
    reader.feed_data(b"after")
    assert reader.buffer == b"after"


async def test_a_chunk_trickling_in_small_pieces_is_stored_whole(server) -> None:
    """End to end through the server's reader: a 1 MiB chunk frame written to the
    socket in pieces of a few KiB (and one of a byte) becomes the declared part."""
    tokens = await register_login(server.http, unique("wstrickle"))
    client = await SyncClient.connect(server.ws, tokens["access"])
    data = os.urandom(client.limits["max_chunk"])
    ok = await client.start_upload([data])
    assert ok["t"] == "upload_ok", ok
    await client.wait_credit(len(data))
    message = msgpack.packb(
        {"t": "chunk", "upload": ok["upload"], "part": 0, "off": 0, "data": data}
    )
    wire = Frame(Opcode.BINARY, message).serialize(mask=True, extensions=[])
    rnd = random.Random(7)
    at = 0
    for size in [1, 13, 1, *(rnd.randrange(1, 9000) for _ in range(60))]:
        client.ws.transport.write(wire[at : at + size])
        at += size
        await asyncio.sleep(0.001)  # separate segments, read separately
    client.ws.transport.write(wire[at:])
    frame = await client.wait_for(lambda f: f.get("upload") == ok["upload"])
    assert frame["t"] == "part_ok", frame
    done = await client.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed", done
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    assert await client.download(change["parts"][0]["id"]) == data
    await client.close()
