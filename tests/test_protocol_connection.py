"""Unit and property tests of protocol.connection.ServerConnection (sans-I/O)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.codec import encode
from protocol.connection import ServerConnection, State
from protocol.errors import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    ProtocolViolation,
    RequestError,
    UnknownFrameType,
)
from protocol.frames import Chunk, Hello, Ping, Put
from protocol.limits import FRAME_OVERHEAD, KiB, Limits
from tests.test_protocol_frames import CLIENT_FRAME_CLASSES, VALID, random_frame

LIMITS = Limits(
    max_frame=1 * KiB + FRAME_OVERHEAD,
    max_chunk=1 * KiB,
    max_partition=4 * KiB,
    max_parts=4,
    window=4 * KiB,
)
HELLO = {"t": "hello", "v": 1, "token": "tok", "device": "dev-1", "cursor": 0}


def connect(limits: Limits = LIMITS) -> ServerConnection:
    conn = ServerConnection(limits)
    assert isinstance(conn.receive(encode(HELLO)), Hello)
    return conn


def chunk(size: int, *, upload: str = "u-1", part: int = 0, off: int = 0) -> bytes:
    return encode({"t": "chunk", "upload": upload, "part": part, "off": off, "data": b"x" * size})


# ----------------------------------------------------------------- handshake


def test_new_connection_awaits_hello_with_a_full_window() -> None:
    conn = ServerConnection(LIMITS)
    assert conn.state is State.AWAIT_HELLO
    assert conn.credit == LIMITS.window


def test_hello_opens_the_session() -> None:
    conn = ServerConnection(LIMITS)
    frame = conn.receive(encode({**HELLO, "cursor": 17}))
    assert frame == Hello(v=1, token="tok", device="dev-1", cursor=17)
    assert conn.state is State.OPEN


@pytest.mark.parametrize("t", sorted(set(VALID) - {"hello"}))
def test_first_frame_other_than_hello_is_a_violation(t: str) -> None:
    conn = ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(encode(VALID[t][0]))
    assert info.value.code == CloseCode.PROTOCOL_VIOLATION
    assert conn.state is not State.OPEN  # a violation never opens the session
    assert conn.credit == LIMITS.window


@pytest.mark.parametrize("t", ["teleport", "", "Hello", "welcome"])
def test_unknown_type_before_hello_is_a_violation_not_a_request_error(t: str) -> None:
    conn = ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(encode({"t": t, "rid": 1}))
    assert info.value.code == 4400
    assert not isinstance(info.value, RequestError)


@pytest.mark.parametrize("v", [0, 2, 99, frames.MAX_ID])
def test_hello_with_unsupported_version_is_a_violation(v: int) -> None:
    conn = ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(encode({**HELLO, "v": v}))
    assert info.value.code == 4400
    assert conn.state is not State.OPEN  # a violation never opens the session


@pytest.mark.parametrize(
    "over",
    [{"v": -1}, {"v": "1"}, {"v": True}, {"token": ""}, {"device": 5}, {"cursor": -1}],
    ids=repr,
)
def test_malformed_hello_is_a_violation(over: dict[str, Any]) -> None:
    conn = ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(encode({**HELLO, **over}))
    assert info.value.code == 4400
    assert conn.state is not State.OPEN  # a violation never opens the session


def test_hello_without_version_is_a_violation() -> None:
    conn = ServerConnection(LIMITS)
    hello = dict(HELLO)
    del hello["v"]
    with pytest.raises(ProtocolViolation):
        conn.receive(encode(hello))
    assert conn.state is not State.OPEN  # a violation never opens the session


def test_second_hello_is_a_violation() -> None:
    conn = connect()
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(encode(HELLO))
    assert info.value.code == 4400


# ------------------------------------------------------------- message types


@pytest.mark.parametrize("opened", [False, True], ids=["await-hello", "open"])
@pytest.mark.parametrize("text", ["", "hello", encode(HELLO).decode("latin-1")])
def test_text_message_is_unsupported_data(opened: bool, text: str) -> None:
    conn = connect() if opened else ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(text)
    assert info.value.code == CloseCode.UNSUPPORTED_DATA == 1003


@pytest.mark.parametrize("opened", [False, True], ids=["await-hello", "open"])
def test_oversize_message_is_message_too_big(opened: bool) -> None:
    conn = connect() if opened else ServerConnection(LIMITS)
    message = encode({**HELLO, "pad": b"x" * LIMITS.max_frame})
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(message)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG == 1009


@pytest.mark.parametrize("opened", [False, True], ids=["await-hello", "open"])
@pytest.mark.parametrize(
    "message",
    [b"", b"\xc1", b"\x90", msgpack.packb({"rid": 1}), msgpack.packb({1: 2, "t": "ping"})],
    ids=["empty", "invalid", "array", "no-t", "int-key"],
)
def test_malformed_message_is_a_4400_violation(opened: bool, message: bytes) -> None:
    conn = connect() if opened else ServerConnection(LIMITS)
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(message)
    assert info.value.code == 4400


@pytest.mark.parametrize("t", sorted(set(VALID) - {"hello"}))
def test_open_session_returns_each_frame(t: str) -> None:
    conn = connect()
    raw, expected = VALID[t]
    assert conn.receive(encode(raw)) == expected
    assert conn.state is State.OPEN


def test_unknown_type_in_open_session_is_a_request_error_and_session_goes_on() -> None:
    conn = connect()
    with pytest.raises(UnknownFrameType) as info:
        conn.receive(encode({"t": "teleport", "rid": 12}))
    assert info.value.rid == 12
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
    assert conn.state is State.OPEN
    assert conn.receive(encode({"t": "ping", "rid": 13})) == Ping(rid=13)


def test_request_error_from_parsing_propagates_in_open_session() -> None:
    conn = connect()
    raw = {**VALID["upload"][0], "rid": 40, "parts": [VALID["upload"][0]["parts"][0]] * 5}
    with pytest.raises(RequestError) as info:
        conn.receive(encode(raw))
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 40
    assert conn.state is State.OPEN


@pytest.mark.parametrize("opened", [False, True], ids=["await-hello", "open"])
def test_receive_after_close_raises(opened: bool) -> None:
    conn = connect() if opened else ServerConnection(LIMITS)
    conn.close()
    assert conn.state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        conn.receive(encode({"t": "ping", "rid": 1}))
    with pytest.raises(ProtocolViolation):
        conn.receive(encode(HELLO))
    with pytest.raises(ProtocolViolation):
        conn.receive("text")


# -------------------------------------------------------------------- credit


def test_chunks_spend_credit() -> None:
    conn = connect()
    assert conn.receive(chunk(1000)) == Chunk(upload="u-1", part=0, off=0, data=b"x" * 1000)
    assert conn.credit == LIMITS.window - 1000
    conn.receive(chunk(24, upload="u-2", part=3))
    assert conn.credit == LIMITS.window - 1024
    conn.receive(chunk(0))
    assert conn.credit == LIMITS.window - 1024


def test_other_frames_do_not_spend_credit() -> None:
    conn = connect()
    for t in sorted(set(VALID) - {"hello", "chunk", "put"}):
        conn.receive(encode(VALID[t][0]))
    assert conn.credit == LIMITS.window


def test_the_whole_window_can_be_spent() -> None:
    conn = connect()
    for _ in range(LIMITS.window // LIMITS.max_chunk):
        conn.receive(chunk(LIMITS.max_chunk))
    assert conn.credit == 0
    conn.receive(chunk(0))
    assert conn.credit == 0


def test_chunk_beyond_remaining_credit_is_a_violation() -> None:
    conn = connect()
    for _ in range(3):
        conn.receive(chunk(LIMITS.max_chunk))
    conn.receive(chunk(LIMITS.max_chunk - 10))
    assert conn.credit == 10
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(chunk(11))
    assert info.value.code == CloseCode.PROTOCOL_VIOLATION
    assert conn.credit == 10
    assert conn.receive(chunk(10)).data == b"x" * 10
    assert conn.credit == 0
    with pytest.raises(ProtocolViolation):
        conn.receive(chunk(1))


def test_chunk_over_max_chunk_within_credit_is_too_large_and_not_charged() -> None:
    conn = connect()
    with pytest.raises(RequestError) as info:
        conn.receive(chunk(LIMITS.max_chunk + 1, upload="u-9", part=2))
    assert not isinstance(info.value, ProtocolViolation)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.upload == "u-9"
    assert info.value.part == 2
    assert conn.credit == LIMITS.window
    assert frames.error_from(info.value)["upload"] == "u-9"
    assert frames.error_from(info.value)["part"] == 2


def test_chunk_over_max_chunk_and_over_credit_is_a_violation() -> None:
    conn = connect()
    for _ in range(3):
        conn.receive(chunk(LIMITS.max_chunk))
    conn.receive(chunk(LIMITS.max_chunk - 100))
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(chunk(LIMITS.max_chunk + 1))
    assert info.value.code == 4400
    assert conn.credit == 100


def test_malformed_chunk_is_not_charged() -> None:
    conn = connect()
    bad = encode({"t": "chunk", "upload": "u-1", "part": LIMITS.max_parts, "off": 0, "data": b"x"})
    with pytest.raises(ProtocolViolation):
        conn.receive(bad)
    assert conn.credit == LIMITS.window


def put(size: int, rid: int = 5) -> bytes:
    return encode({**VALID["put"][0], "rid": rid, "data": b"x" * size})


def test_put_data_spends_credit_like_chunks() -> None:
    conn = connect()
    assert isinstance(conn.receive(put(1000)), Put)
    conn.receive(chunk(1000))
    assert conn.credit == LIMITS.window - 2000
    assert conn.release(2000) == frames.credit(2000)
    assert conn.credit == LIMITS.window


def test_put_beyond_remaining_credit_is_a_violation() -> None:
    conn = connect()
    for _ in range(LIMITS.window // LIMITS.max_chunk):
        conn.receive(put(LIMITS.max_chunk))
    with pytest.raises(ProtocolViolation) as info:
        conn.receive(put(1))
    assert info.value.code == CloseCode.PROTOCOL_VIOLATION
    assert "put data" in str(info.value)


def test_put_over_max_chunk_is_too_large_with_rid_and_not_charged() -> None:
    conn = connect()
    with pytest.raises(RequestError) as info:
        conn.receive(put(LIMITS.max_chunk + 1, rid=77))
    assert not isinstance(info.value, ProtocolViolation)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 77
    assert info.value.upload == VALID["put"][0]["upload"]
    assert conn.credit == LIMITS.window


def test_release_in_quarter_window_batches() -> None:
    conn = connect()
    quarter = LIMITS.window // 4
    for _ in range(4):
        conn.receive(chunk(LIMITS.max_chunk))
    assert conn.credit == 0
    assert conn.release(quarter - 1) is None
    assert conn.credit == 0
    assert conn.release(1) == {"t": "credit", "bytes": quarter}
    assert conn.credit == quarter
    assert conn.release(quarter + 5) == {"t": "credit", "bytes": quarter + 5}
    assert conn.credit == 2 * quarter + 5


def test_release_returns_credit_when_nothing_is_outstanding() -> None:
    conn = connect()
    conn.receive(chunk(100))
    assert conn.release(100) == {"t": "credit", "bytes": 100}
    assert conn.credit == LIMITS.window


def test_release_flushes_owed_bytes_once_nothing_is_outstanding() -> None:
    conn = connect()
    conn.receive(chunk(300))
    conn.receive(chunk(200))
    assert conn.release(120) is None
    assert conn.credit == LIMITS.window - 500
    assert conn.release(380) == {"t": "credit", "bytes": 500}
    assert conn.credit == LIMITS.window


def test_release_of_zero_returns_nothing() -> None:
    conn = connect()
    assert conn.release(0) is None
    conn.receive(chunk(10))
    assert conn.release(0) is None
    assert conn.credit == LIMITS.window - 10


def test_credit_frame_survives_the_codec() -> None:
    conn = connect()
    conn.receive(chunk(7))
    frame = conn.release(7)
    assert frame is not None
    assert msgpack.unpackb(encode(frame)) == {"t": "credit", "bytes": 7}


def test_release_more_than_spent_is_a_value_error() -> None:
    conn = connect()
    with pytest.raises(ValueError):
        conn.release(1)
    conn.receive(chunk(100))
    with pytest.raises(ValueError):
        conn.release(101)
    assert conn.credit == LIMITS.window - 100
    assert conn.release(60) is None
    with pytest.raises(ValueError):
        conn.release(41)
    assert conn.release(40) == {"t": "credit", "bytes": 100}
    with pytest.raises(ValueError):
        conn.release(1)
    assert conn.credit == LIMITS.window


def test_release_negative_is_a_value_error() -> None:
    conn = connect()
    conn.receive(chunk(100))
    with pytest.raises(ValueError):
        conn.release(-1)
    assert conn.credit == LIMITS.window - 100


def test_rejected_chunk_cannot_be_released() -> None:
    conn = connect()
    with pytest.raises(RequestError):
        conn.receive(chunk(LIMITS.max_chunk + 1))
    with pytest.raises(ValueError):
        conn.release(LIMITS.max_chunk + 1)


def test_returned_credit_can_be_spent_again() -> None:
    conn = connect()
    for _ in range(4):
        conn.receive(chunk(LIMITS.max_chunk))
    with pytest.raises(ProtocolViolation):
        conn.receive(chunk(1))
    assert conn.release(LIMITS.max_chunk) == {"t": "credit", "bytes": LIMITS.max_chunk}
    conn.receive(chunk(LIMITS.max_chunk))
    assert conn.credit == 0


def test_tiny_window_release_always_flushes() -> None:
    # window // 4 == 0: every release that owes bytes returns them at once.
    limits = Limits(max_frame=2 + FRAME_OVERHEAD, max_chunk=2, window=3, max_partition=8)
    limits.validate()
    conn = connect(limits)
    conn.receive(chunk(2))
    conn.receive(chunk(1))
    assert conn.release(1) == {"t": "credit", "bytes": 1}
    assert conn.release(2) == {"t": "credit", "bytes": 2}
    assert conn.credit == 3


# ---------------------------------------------------------------- properties


def _check_only_protocol_errors(conn: ServerConnection, message: bytes) -> None:
    """Feed one message; only ProtocolError subclasses may escape, state stays coherent."""
    before_state, before_credit = conn.state, conn.credit
    try:
        frame = conn.receive(message)
    except ProtocolViolation as exc:
        assert exc.code in (CloseCode.PROTOCOL_VIOLATION, CloseCode.MESSAGE_TOO_BIG)
        # The caller closes the session; the machine must not have advanced.
        assert conn.state in (before_state, State.CLOSED)
        assert conn.credit == before_credit
    except RequestError as exc:
        # Before hello every failure must close the session; after it, a reply is fine.
        assert before_state is State.OPEN, f"RequestError before hello: {exc!r}"
        assert isinstance(exc.code, ErrorCode)
        assert conn.state is State.OPEN
        assert conn.credit == before_credit
    except ProtocolError as exc:
        pytest.fail(f"unexpected ProtocolError subclass: {exc!r}")
    else:
        assert isinstance(frame, CLIENT_FRAME_CLASSES)
        assert isinstance(frame, Hello) is (before_state is State.AWAIT_HELLO)
        assert conn.state is State.OPEN
        spent = len(frame.data) if isinstance(frame, Chunk) else 0
        assert conn.credit == before_credit - spent


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=4096))
def test_random_bytes_before_hello_only_raise_protocol_errors(message: bytes) -> None:
    _check_only_protocol_errors(ServerConnection(LIMITS), message)


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=4096))
def test_random_bytes_in_open_session_only_raise_protocol_errors(message: bytes) -> None:
    _check_only_protocol_errors(connect(), message)


@settings(max_examples=400, deadline=None)
@given(frame=random_frame())
def test_random_maps_before_hello_only_raise_protocol_errors(frame: dict[str, Any]) -> None:
    _check_only_protocol_errors(ServerConnection(LIMITS), msgpack.packb(frame, use_bin_type=True))


@settings(max_examples=400, deadline=None)
@given(frames_=st.lists(random_frame(), min_size=1, max_size=4))
def test_random_maps_in_open_session_only_raise_protocol_errors(
    frames_: list[dict[str, Any]],
) -> None:
    conn = connect()
    for frame in frames_:
        _check_only_protocol_errors(conn, msgpack.packb(frame, use_bin_type=True))


_credit_limits = st.integers(min_value=1, max_value=64).flatmap(
    lambda max_chunk: st.builds(
        Limits,
        max_frame=st.just(max_chunk + FRAME_OVERHEAD),
        max_chunk=st.just(max_chunk),
        max_partition=st.just(1024),
        max_parts=st.just(4),
        window=st.integers(min_value=max_chunk, max_value=8 * max_chunk),
    )
)
_op = st.one_of(
    st.tuples(st.just("chunk"), st.integers(min_value=0, max_value=130)),
    st.tuples(st.just("release"), st.floats(min_value=0, max_value=1)),
    st.tuples(st.just("release_raw"), st.integers(min_value=-2, max_value=600)),
)


@settings(max_examples=300, deadline=None)
@given(limits=_credit_limits, ops=st.lists(_op, max_size=40))
def test_credit_window_property(limits: Limits, ops: list[tuple[str, Any]]) -> None:
    limits.validate()
    conn = connect(limits)
    window = limits.window
    credit = window  # the client's view: what it may still send
    owed = 0  # released by the server but not yet returned to the client
    unreleased = 0  # spent by the client, not yet released by the server
    for op, arg in ops:
        if op == "chunk":
            size = arg
            if size > credit:
                with pytest.raises(ProtocolViolation) as info:
                    conn.receive(chunk(size))
                assert info.value.code == CloseCode.PROTOCOL_VIOLATION
            elif size > limits.max_chunk:
                with pytest.raises(RequestError) as req:
                    conn.receive(chunk(size))
                assert req.value.code == ErrorCode.TOO_LARGE
            else:
                assert len(conn.receive(chunk(size)).data) == size
                credit -= size
                unreleased += size
        else:
            n = round(arg * unreleased) if op == "release" else arg
            if n < 0 or n > unreleased:
                with pytest.raises(ValueError):
                    conn.release(n)
            else:
                unreleased -= n
                owed += n
                outstanding = window - credit - owed
                frame = conn.release(n)
                if owed and (owed >= window // 4 or outstanding == 0):
                    assert frame == {"t": "credit", "bytes": owed}
                    credit += owed
                    owed = 0
                else:
                    assert frame is None
        assert conn.credit == credit
        assert 0 <= conn.credit <= window
        assert credit + owed + unreleased == window
    # Releasing everything still outstanding always gives the whole window back.
    frame = conn.release(unreleased)
    if unreleased or owed:
        assert frame == {"t": "credit", "bytes": unreleased + owed}
    else:
        assert frame is None
    assert conn.credit == window
    with pytest.raises(ValueError):
        conn.release(1)
