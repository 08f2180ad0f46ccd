"""Unit and property tests of protocol.codec: msgpack framing with hard caps."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.codec import (
    LIFT_KEYS,
    LIFT_MIN,
    LIFT_SLACK,
    _decode_chunk,
    data_head,
    decode,
    encode,
)
from protocol.errors import CloseCode, FrameError, ProtocolError, ProtocolViolation
from protocol.limits import Limits

MAX_FRAME = 64 * 1024


def packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ------------------------------------------------------------------ size cap


def test_message_over_max_frame_closes_with_1009() -> None:
    message = encode({"t": "ping", "rid": 1, "pad": b"x" * 200})
    with pytest.raises(ProtocolViolation) as info:
        decode(message, len(message) - 1)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert info.value.code == 1009
    assert not isinstance(info.value, FrameError)


def test_message_of_exactly_max_frame_is_accepted() -> None:
    message = encode({"t": "ping", "rid": 1, "pad": b"x" * 200})
    assert decode(message, len(message)) == {"t": "ping", "rid": 1, "pad": b"x" * 200}


def test_size_is_checked_before_parsing() -> None:
    # Garbage that is also too big is reported as too big, not as bad msgpack.
    with pytest.raises(ProtocolViolation) as info:
        decode(b"\xc1" * 100, 99)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


# ------------------------------------------------------------ malformed input


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x81\xa1t", id="truncated-map"),
        pytest.param(b"\x82\xa1t\xa4ping", id="map-missing-a-pair"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-claims-4G-items"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-claims-4G-pairs"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-claims-4G-bytes"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-claims-4G-bytes"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="nested-too-deep"),
        pytest.param(b"\x81\xa1t\xa3\xff\xfe\xfd", id="invalid-utf8-str"),
        pytest.param(b"\x81\x91\x01\x01", id="unhashable-list-key"),
    ],
)
def test_invalid_msgpack_is_a_frame_error(message: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode(message, MAX_FRAME)
    assert info.value.code == CloseCode.PROTOCOL_VIOLATION == 4400


def test_trailing_bytes_are_a_frame_error() -> None:
    message = encode({"t": "ping", "rid": 1})
    assert decode(message, MAX_FRAME) == {"t": "ping", "rid": 1}
    with pytest.raises(FrameError) as info:
        decode(message + b"\xc0", MAX_FRAME)
    assert info.value.code == 4400
    with pytest.raises(FrameError):
        decode(message + message, MAX_FRAME)


@pytest.mark.parametrize(
    "obj",
    [None, True, 0, -1, 1.5, "ping", b"ping", [], ["t", "ping"], [{"t": "ping"}]],
    ids=repr,
)
def test_top_level_must_be_a_map(obj: object) -> None:
    with pytest.raises(FrameError) as info:
        decode(packb(obj), MAX_FRAME)
    assert info.value.code == 4400


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "ping", 1: "x"},
        {"t": "ping", b"rid": 1},
        {"t": "ping", None: 1},
        {"t": "ping", True: 1},
        {"t": "ping", 1.5: 1},
    ],
    ids=repr,
)
def test_non_string_keys_are_a_frame_error(obj: dict) -> None:
    with pytest.raises(FrameError) as info:
        decode(packb(obj), MAX_FRAME)
    assert info.value.code == 4400


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"rid": 1},
        {"t": None},
        {"t": 1},
        {"t": True},
        {"t": b"ping"},
        {"t": ["ping"]},
        {"t": {"x": 1}},
        {"T": "ping"},
    ],
    ids=repr,
)
def test_missing_or_non_string_t_is_a_frame_error(obj: dict) -> None:
    with pytest.raises(FrameError) as info:
        decode(packb(obj), MAX_FRAME)
    assert info.value.code == 4400


@pytest.mark.parametrize(
    "ext",
    [
        pytest.param(packb(msgpack.ExtType(5, b"")), id="ext8-empty"),
        pytest.param(packb(msgpack.ExtType(5, b"x")), id="fixext1"),
        pytest.param(packb(msgpack.ExtType(42, b"x" * 300)), id="ext16"),
        pytest.param(b"\xd6\xf9abcd", id="negative-type"),
        pytest.param(packb(msgpack.Timestamp(1, 0)), id="timestamp32"),
        pytest.param(packb(msgpack.Timestamp(1 << 40, 5)), id="timestamp96"),
    ],
)
@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"", id="top-level"),
        pytest.param(b"\x82\xa1t\xa4ping\xa3rid", id="in-value"),
        pytest.param(b"\x82\xa1t\xa6upload\xa4meta\x81\xa4name\x92\x01\x81\xa4deep", id="nested"),
    ],
)
def test_msgpack_extension_types_are_a_frame_error(ext: bytes, prefix: bytes) -> None:
    message = prefix + ext
    # Well-formed msgpack: only the extension is objectionable.
    msgpack.unpackb(message, ext_hook=lambda code, data: (code, data))
    with pytest.raises(FrameError) as info:
        decode(message, MAX_FRAME)
    assert info.value.code == 4400


def test_ext_type_raised_from_the_hook_is_a_frame_error() -> None:
    # ext8 with an empty payload reaches the ext hook itself (not the length cap).
    message = b"\x82\xa1t\xa4ping\xa3rid\xc7\x00\x05"
    with pytest.raises(FrameError) as info:
        decode(message, MAX_FRAME)
    assert "extension" in info.value.reason


def test_string_over_max_frame_length_inside_message_is_rejected() -> None:
    # A str header claiming more bytes than max_frame allows never allocates.
    message = b"\x81\xa1t\xdb" + (MAX_FRAME + 1).to_bytes(4, "big")
    with pytest.raises(FrameError):
        decode(message, MAX_FRAME)


def test_frame_error_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        decode(b"\xc1", MAX_FRAME)


# ---------------------------------------------------------------- round trip


def test_round_trip_preserves_bytes_as_bin_and_strings_as_str() -> None:
    frame = {
        "t": "chunk",
        "upload": "u-1",
        "part": 3,
        "off": 0,
        "data": b"\x00\xff binary",
        "text": "h\u00e9llo",
        "nested": {"k": b"v", "s": "v", "l": [b"a", "a", 1, None, True, 1.25]},
    }
    decoded = decode(encode(frame), MAX_FRAME)
    assert decoded == frame
    assert type(decoded["data"]) is bytes
    assert type(decoded["text"]) is str
    assert type(decoded["upload"]) is str
    assert type(decoded["nested"]["k"]) is bytes
    assert type(decoded["nested"]["s"]) is str
    assert [type(x) for x in decoded["nested"]["l"][:2]] == [bytes, str]


def test_encode_uses_bin_type_for_bytes() -> None:
    assert encode({"t": "x", "b": b"ab"}) == b"\x82\xa1t\xa1x\xa1b\xc4\x02ab"


def test_empty_bytes_and_empty_string_stay_distinct() -> None:
    decoded = decode(encode({"t": "", "b": b"", "s": ""}), MAX_FRAME)
    assert decoded == {"t": "", "b": b"", "s": ""}
    assert type(decoded["b"]) is bytes
    assert type(decoded["s"]) is str


def test_large_integers_round_trip() -> None:
    frame = {"t": "x", "big": (1 << 64) - 1, "small": -(1 << 63)}
    assert decode(encode(frame), MAX_FRAME) == frame


# ---------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(message=st.binary(max_size=4096), max_frame=st.integers(min_value=0, max_value=5000))
def test_random_bytes_only_raise_protocol_errors(message: bytes, max_frame: int) -> None:
    try:
        frame = decode(message, max_frame)
    except ProtocolViolation as exc:
        expected = (
            CloseCode.MESSAGE_TOO_BIG if len(message) > max_frame else CloseCode.PROTOCOL_VIOLATION
        )
        assert exc.code == expected
    except ProtocolError as exc:
        pytest.fail(f"decode raised a ProtocolError that is not a violation: {exc!r}")
    else:
        assert len(message) <= max_frame
        assert isinstance(frame, dict)
        assert isinstance(frame["t"], str)
        assert all(isinstance(k, str) for k in frame)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    t=st.text(max_size=12),
    body=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "t"), _values, max_size=6),
)
def test_encode_decode_round_trip_property(t: str, body: dict) -> None:
    frame = {"t": t, **body}
    assert decode(encode(frame), len(encode(frame))) == frame


# ------------------------------------------------------------------ data head


@settings(max_examples=300, deadline=None)
@given(
    rid=st.integers(0, 2**63 - 1),
    off=st.integers(0, 2**63 - 1),
    size=st.sampled_from([0, 1, 255, 256, 65535, 65536, 1 << 20]),
    end=st.booleans(),
)
def test_data_head_plus_payload_is_the_data_frame(rid: int, off: int, size: int, end: bool) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    head = data_head(rid, off, size, end)
    assert len(head) <= 49
    assert decode(head + payload, 2 << 20) == frames.data(rid, off, payload, end)


def test_data_head_without_its_payload_is_not_a_frame() -> None:
    with pytest.raises(FrameError):
        decode(data_head(1, 0, 10, False) + b"short", 1 << 20)


# ------------------------------------------------- chunk frames without a copy

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300)
)


def _reference(message: bytes) -> object:
    return msgpack.unpackb(message, raw=False, strict_map_key=False, timestamp=0)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(st.text(max_size=12), _SCALARS, max_size=8),
    data=st.integers(min_value=0, max_value=3 * LIFT_MIN),
)
def test_a_large_chunk_decodes_as_msgpack_does_with_its_data_uncopied(
    fields: dict, data: int
) -> None:
    frame = {**fields, "t": "chunk", "data": b"\x07" * data}
    message = packb(frame)
    got = decode(message, len(message))
    assert got == _reference(message) == frame
    lifted = data >= LIFT_MIN and len(frame) <= LIFT_KEYS and len(message) - data <= LIFT_SLACK
    assert isinstance(got["data"], memoryview) == lifted
    if lifted:
        assert got["data"].obj is message  # a view of the message: no copy
        assert got["data"].readonly


@settings(max_examples=400, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=LIFT_MIN + 200),
    flip=st.integers(min_value=0, max_value=LIFT_MIN + 200),
    byte=st.integers(min_value=0, max_value=255),
    tail=st.binary(max_size=3),
    fields=st.dictionaries(
        st.text(max_size=5), _SCALARS | st.lists(st.integers(0, 1000)), max_size=4
    ),
)
def test_the_chunk_fast_path_accepts_only_what_msgpack_decodes_the_same(
    cut: int, flip: int, byte: int, tail: bytes, fields: dict
) -> None:
    """Damaged, nested, trailing: the fast path either decodes a message exactly as
    msgpack does or leaves it to msgpack (which then judges it as before)."""
    message = bytearray(packb({"t": "chunk", **fields, "off": 5, "data": b"d" * LIFT_MIN}))
    if flip < len(message):
        message[flip] = byte
    message = bytes(message[: len(message) - cut % 7] + tail)
    fast = _decode_chunk(message)
    if fast is not None:
        assert fast == _reference(message)
        assert fast["t"] == "chunk"


def test_only_chunk_frames_are_lifted() -> None:
    message = packb({"t": "put", "rid": 1, "data": b"x" * (2 * LIFT_MIN)})
    assert isinstance(decode(message, len(message))["data"], bytes)
    small = packb({"t": "chunk", "upload": "u", "part": 0, "off": 0, "data": b"x" * 100})
    assert isinstance(decode(small, len(small))["data"], bytes)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "chunk", 1: "int key", "data": b"x" * LIFT_MIN},
        {"t": "chunk", "nested": [1, 2], "data": b"x" * LIFT_MIN},
        {"t": "chunk", "data": b"x" * LIFT_MIN, "s": "y" * (1 << 20 + 1)},
    ],
)
def test_what_the_fast_path_leaves_is_judged_as_before(frame: dict) -> None:
    message = packb(frame)
    assert _decode_chunk(message) is None
    if 1 in frame or "s" in frame:
        with pytest.raises(FrameError):
            decode(message, len(message))
    else:
        assert decode(message, len(message)) == frame


def test_a_lifted_chunk_is_a_valid_chunk_frame() -> None:
    message = packb({"t": "chunk", "upload": "u1", "part": 2, "off": 0, "data": b"z" * LIFT_MIN})
    chunk = frames.parse_client_frame(decode(message, len(message)), Limits())
    assert isinstance(chunk, frames.Chunk)
    assert bytes(chunk.data) == b"z" * LIFT_MIN


@pytest.mark.parametrize(
    "frame",
    [
        # Padding beside a small data: a view would hold 64 KiB for 16 KiB of credit.
        {"t": "chunk", "pad": b"p" * (4 * LIFT_MIN), "data": b"d" * LIFT_MIN},
        # Two data keys (the last wins): the first would be held by the view.
        {"t": "chunk", "data0": b"x" * (4 * LIFT_MIN), "off": 0, "data": b"d" * LIFT_MIN},
    ],
)
def test_a_chunk_with_more_than_its_data_is_copied_not_viewed(frame: dict) -> None:
    message = packb(frame)
    if "data0" in frame:  # a map with "data" twice, as a hostile client may send
        message = message.replace(b"\xa5data0", b"\xa4data", 1)
    got = decode(message, len(message))
    assert got == _reference(message)
    assert isinstance(got["data"], bytes)


def test_a_chunk_of_many_keys_is_left_to_msgpack() -> None:
    """A Python loop over a map of 65k keys cost 20 times msgpack's decode."""
    frame = {"t": "chunk", "data": b"x" * LIFT_MIN, **{f"k{i}": 0 for i in range(LIFT_KEYS)}}
    message = packb(frame)
    assert _decode_chunk(message) is None
    assert decode(message, len(message)) == frame
