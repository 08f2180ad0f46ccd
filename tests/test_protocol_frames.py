"""Unit and property tests of protocol.frames (client parsing, server builders) and Limits."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import frames
from protocol.codec import decode, encode
from protocol.errors import (
    CloseCode,
    ErrorCode,
    FrameError,
    ProtocolError,
    ProtocolViolation,
    RequestError,
    UnknownFrameType,
)
from protocol.frames import (
    Abort,
    Ack,
    Chunk,
    Commit,
    Delete,
    Get,
    Hello,
    Info,
    Meta,
    PartSpec,
    Ping,
    Put,
    Reauth,
    Resume,
    Upload,
    parse_client_frame,
)
from protocol.limits import FRAME_OVERHEAD, KiB, Limits

LIMITS = Limits(
    max_frame=1 * KiB + FRAME_OVERHEAD,
    max_chunk=1 * KiB,
    max_partition=4 * KiB,
    max_parts=4,
    window=4 * KiB,
)

SHA = bytes(range(32))
META = {"name": b"enc-name", "mtime": b"enc-mtime", "key": b"k" * 32, "salt": b"s" * 16}


def part(size: int = 100, **over: Any) -> dict[str, Any]:
    return {"size": size, "sha256": SHA, "key": b"pk", "salt": b"ps", **over}


def upload(**over: Any) -> dict[str, Any]:
    """A valid upload of a new revision of object 7 (edited from rev 3) with two parts."""
    frame = {
        "t": "upload",
        "rid": 11,
        "object": 7,
        "base": 3,
        "kind": "file",
        "meta": dict(META),
        "parts": [part(100), part(200)],
    }
    frame.update(over)
    return frame


def _meta() -> Meta:
    return Meta(name=b"enc-name", mtime=b"enc-mtime", key=b"k" * 32, salt=b"s" * 16)


def _spec(size: int) -> PartSpec:
    return PartSpec(size=size, sha256=SHA, key=b"pk", salt=b"ps")


PUT_ID = "Zx9_-Q" * 3

#: One valid map per client frame type, with the dataclass it parses into.
VALID: dict[str, tuple[dict[str, Any], Any]] = {
    "hello": (
        {"t": "hello", "v": 1, "token": "tok", "device": "dev-1", "cursor": 0},
        Hello(v=1, token="tok", device="dev-1", cursor=0),
    ),
    "ack": ({"t": "ack", "cursor": 42}, Ack(cursor=42)),
    "upload": (
        upload(),
        Upload(
            rid=11,
            object=7,
            base=3,
            kind="file",
            meta=_meta(),
            parts=(_spec(100), _spec(200)),
        ),
    ),
    "put": (
        {
            "t": "put",
            "rid": 12,
            "upload": PUT_ID,
            "object": 7,
            "base": 3,
            "meta": dict(META),
            "part": part(3),
            "data": b"abc",
        },
        Put(rid=12, upload=PUT_ID, object=7, base=3, meta=_meta(), part=_spec(3), data=b"abc"),
    ),
    "chunk": (
        {"t": "chunk", "upload": "u-1", "part": 1, "off": 512, "data": b"abc"},
        Chunk(upload="u-1", part=1, off=512, data=b"abc"),
    ),
    "commit": ({"t": "commit", "rid": 2, "upload": "u-1"}, Commit(rid=2, upload="u-1")),
    "resume": ({"t": "resume", "rid": 3, "upload": "u-1"}, Resume(rid=3, upload="u-1")),
    "abort": ({"t": "abort", "rid": 4, "upload": "u-1"}, Abort(rid=4, upload="u-1")),
    "delete": (
        {"t": "delete", "rid": 5, "object": 7, "base": 2},
        Delete(rid=5, object=7, base=2),
    ),
    "get": ({"t": "get", "rid": 6, "part": 9, "off": 100}, Get(rid=6, part=9, off=100)),
    "info": ({"t": "info", "rid": 7, "part": 9}, Info(rid=7, part=9)),
    "ping": ({"t": "ping", "rid": 8}, Ping(rid=8)),
    "reauth": ({"t": "reauth", "rid": 9, "token": "tok2"}, Reauth(rid=9, token="tok2")),
}

OPTIONAL = {("get", "off")}

REQUIRED_FIELDS = [
    (t, name)
    for t, (m, _) in VALID.items()
    for name in m
    if name != "t" and (t, name) not in OPTIONAL
]


def test_every_client_frame_type_has_a_case() -> None:
    assert set(VALID) == set(frames.CLIENT_FRAME_TYPES)


# ------------------------------------------------------------ valid parsing


@pytest.mark.parametrize("t", sorted(VALID))
def test_valid_frame_parses_into_its_dataclass(t: str) -> None:
    raw, expected = VALID[t]
    assert parse_client_frame(raw, LIMITS) == expected


@pytest.mark.parametrize("t", sorted(VALID))
def test_valid_frame_survives_the_codec(t: str) -> None:
    raw, expected = VALID[t]
    assert parse_client_frame(decode(encode(raw), LIMITS.max_frame), LIMITS) == expected


@pytest.mark.parametrize("t", sorted(VALID))
def test_unknown_keys_are_ignored(t: str) -> None:
    raw, expected = VALID[t]
    extended = {**raw, "future": {"x": [1, b"2"]}, "zz": None, "": 0}
    assert parse_client_frame(extended, LIMITS) == expected


def test_unknown_keys_in_nested_maps_are_ignored() -> None:
    raw = upload(meta={**META, "extra": 1}, parts=[part(100, extra="x")])
    parsed = parse_client_frame(raw, LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.meta == _meta()
    assert parsed.parts == (_spec(100),)


# ------------------------------------------------------------ shape errors


@pytest.mark.parametrize(
    ("t", "name"), REQUIRED_FIELDS, ids=[f"{t}.{n}" for t, n in REQUIRED_FIELDS]
)
def test_missing_required_field_is_a_frame_error(t: str, name: str) -> None:
    raw = dict(VALID[t][0])
    del raw[name]
    with pytest.raises(FrameError) as info:
        parse_client_frame(raw, LIMITS)
    assert info.value.code == CloseCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize(
    ("t", "name"), REQUIRED_FIELDS, ids=[f"{t}.{n}" for t, n in REQUIRED_FIELDS]
)
def test_nil_required_field_is_a_frame_error(t: str, name: str) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID[t][0], name: None}, LIMITS)


_int_fields = [
    ("hello", "v"),
    ("hello", "cursor"),
    ("ack", "cursor"),
    ("upload", "rid"),
    ("upload", "object"),
    ("upload", "base"),
    ("put", "rid"),
    ("put", "object"),
    ("put", "base"),
    ("chunk", "part"),
    ("chunk", "off"),
    ("commit", "rid"),
    ("resume", "rid"),
    ("abort", "rid"),
    ("delete", "rid"),
    ("delete", "object"),
    ("delete", "base"),
    ("get", "rid"),
    ("get", "part"),
    ("get", "off"),
    ("info", "rid"),
    ("info", "part"),
    ("ping", "rid"),
    ("reauth", "rid"),
]


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", b"1", [1], {"n": 1}], ids=repr)
@pytest.mark.parametrize(("t", "name"), _int_fields, ids=[f"{t}.{n}" for t, n in _int_fields])
def test_int_field_of_another_type_is_a_frame_error(t: str, name: str, bad: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID[t][0], name: bad}, LIMITS)


# Ints below the lowest value the contract allows (ids and revisions start at 1).
_below_range = [
    ("hello", "v", -1),
    ("hello", "cursor", -1),
    ("ack", "cursor", -1),
    ("upload", "rid", -1),
    ("upload", "object", 0),
    ("upload", "base", 0),
    ("put", "rid", -1),
    ("put", "object", 0),
    ("put", "base", 0),
    ("chunk", "part", -1),
    ("chunk", "off", -1),
    ("commit", "rid", -1),
    ("resume", "rid", -1),
    ("abort", "rid", -1),
    ("delete", "rid", -1),
    ("delete", "object", 0),
    ("delete", "base", 0),
    ("get", "rid", -1),
    ("get", "part", 0),
    ("get", "off", -1),
    ("info", "rid", -1),
    ("info", "part", 0),
    ("ping", "rid", -1),
    ("reauth", "rid", -1),
]


@pytest.mark.parametrize(
    ("t", "name", "value"), _below_range, ids=[f"{t}.{n}={v}" for t, n, v in _below_range]
)
def test_int_below_range_is_a_frame_error(t: str, name: str, value: int) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID[t][0], name: value}, LIMITS)


@pytest.mark.parametrize(("t", "name"), _int_fields, ids=[f"{t}.{n}" for t, n in _int_fields])
def test_int_above_max_id_is_a_frame_error(t: str, name: str) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID[t][0], name: frames.MAX_ID + 1}, LIMITS)


def test_max_id_itself_is_accepted() -> None:
    parsed = parse_client_frame({"t": "ping", "rid": frames.MAX_ID}, LIMITS)
    assert parsed == Ping(rid=frames.MAX_ID)


_str_fields = [
    ("hello", "token", frames.MAX_TOKEN),
    ("hello", "device", frames.MAX_DEVICE),
    ("chunk", "upload", frames.MAX_UPLOAD_ID),
    ("commit", "upload", frames.MAX_UPLOAD_ID),
    ("resume", "upload", frames.MAX_UPLOAD_ID),
    ("abort", "upload", frames.MAX_UPLOAD_ID),
    ("reauth", "token", frames.MAX_TOKEN),
]


@pytest.mark.parametrize("bad", [b"tok", 1, True, None, ["tok"]], ids=repr)
@pytest.mark.parametrize(
    ("t", "name", "cap"), _str_fields, ids=[f"{t}.{n}" for t, n, _ in _str_fields]
)
def test_str_field_of_another_type_is_a_frame_error(
    t: str, name: str, cap: int, bad: object
) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID[t][0], name: bad}, LIMITS)


@pytest.mark.parametrize(
    ("t", "name", "cap"), _str_fields, ids=[f"{t}.{n}" for t, n, _ in _str_fields]
)
def test_str_field_length_bounds(t: str, name: str, cap: int) -> None:
    ok = parse_client_frame({**VALID[t][0], name: "x" * cap}, LIMITS)
    assert getattr(ok, name) == "x" * cap
    for bad in ("", "x" * (cap + 1)):
        with pytest.raises(FrameError):
            parse_client_frame({**VALID[t][0], name: bad}, LIMITS)


@pytest.mark.parametrize(
    ("t", "name", "cap"), _str_fields, ids=[f"{t}.{n}" for t, n, _ in _str_fields]
)
def test_str_field_with_a_nul_is_a_frame_error(t: str, name: str, cap: int) -> None:
    """PostgreSQL's text holds no NUL: refused here, not by a statement (which, in a
    batch of several sessions' writes, would fail theirs too)."""
    with pytest.raises(FrameError, match="NUL"):
        parse_client_frame({**VALID[t][0], name: "ab\x00c"}, LIMITS)


@pytest.mark.parametrize("bad", ["abc", 1, None, [b"abc"], bytearray(b"abc")], ids=repr)
def test_chunk_data_must_be_bytes(bad: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame({**VALID["chunk"][0], "data": bad}, LIMITS)


def test_chunk_data_may_be_empty() -> None:
    parsed = parse_client_frame({**VALID["chunk"][0], "data": b""}, LIMITS)
    assert parsed == Chunk(upload="u-1", part=1, off=512, data=b"")


def test_chunk_part_index_must_be_below_max_parts() -> None:
    last = parse_client_frame({**VALID["chunk"][0], "part": LIMITS.max_parts - 1}, LIMITS)
    assert isinstance(last, Chunk)
    assert last.part == LIMITS.max_parts - 1
    with pytest.raises(FrameError):
        parse_client_frame({**VALID["chunk"][0], "part": LIMITS.max_parts}, LIMITS)


@pytest.mark.parametrize("raw_off", [{}, {"off": None}, {"off": 0}], ids=["absent", "nil", "zero"])
def test_get_off_defaults_to_zero(raw_off: dict[str, Any]) -> None:
    raw = {"t": "get", "rid": 1, "part": 2, **raw_off}
    assert parse_client_frame(raw, LIMITS) == Get(rid=1, part=2, off=0)


def test_hello_accepts_any_nonnegative_version_for_the_connection_to_judge() -> None:
    raw = {**VALID["hello"][0], "v": 2}
    assert parse_client_frame(raw, LIMITS) == Hello(v=2, token="tok", device="dev-1", cursor=0)


# ------------------------------------------------------------ upload rules


def test_new_object_upload_has_no_object_and_base() -> None:
    raw = upload()
    del raw["object"], raw["base"]
    parsed = parse_client_frame(raw, LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.object is None
    assert parsed.base is None
    assert parsed.size == 300


def test_nil_object_and_base_mean_a_new_object() -> None:
    parsed = parse_client_frame(upload(object=None, base=None), LIMITS)
    assert isinstance(parsed, Upload)
    assert (parsed.object, parsed.base) == (None, None)


@pytest.mark.parametrize(
    "over",
    [{"object": None}, {"base": None}],
    ids=["base-without-object", "object-without-base"],
)
def test_object_and_base_must_come_together(over: dict[str, Any]) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(**over), LIMITS)


@pytest.mark.parametrize("kind", ["symlink", "FILE", "", 1, None, b"file"], ids=repr)
def test_upload_kind_must_be_file_or_dir(kind: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(kind=kind), LIMITS)


def test_dir_upload_without_parts() -> None:
    parsed = parse_client_frame(upload(kind="dir", parts=[]), LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.kind == "dir"
    assert parsed.parts == ()
    assert parsed.size == 0


def test_dir_with_parts_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(kind="dir", parts=[part(1)]), LIMITS)


def put(**over: Any) -> dict[str, Any]:
    return {**VALID["put"][0], **over}


def test_put_of_a_new_object_leaves_out_object_and_base() -> None:
    raw = put()
    del raw["object"], raw["base"]
    parsed = parse_client_frame(raw, LIMITS)
    assert isinstance(parsed, Put)
    assert (parsed.object, parsed.base) == (None, None)
    assert parsed.as_upload() == Upload(12, None, None, "file", _meta(), (_spec(3),))


@pytest.mark.parametrize(
    "upload_id",
    ["a" * 15, "a" * (frames.MAX_UPLOAD_ID + 1), "a" * 15 + "/", "a" * 15 + "=", "ä" * 16, ""],
    ids=repr,
)
def test_put_id_must_be_16_to_64_url_safe_characters(upload_id: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame(put(upload=upload_id), LIMITS)
    assert "put.upload" in str(info.value)


@pytest.mark.parametrize("upload_id", ["a" * 16, "A-z_09" * 10 + "abcd"])
def test_put_id_bounds_are_accepted(upload_id: str) -> None:
    assert isinstance(parse_client_frame(put(upload=upload_id), LIMITS), Put)


@pytest.mark.parametrize(
    "over",
    [{"object": None}, {"base": None}],
    ids=["base only", "object only"],
)
def test_put_object_and_base_go_together(over: dict[str, Any]) -> None:
    with pytest.raises(FrameError, match="go together"):
        parse_client_frame(put(**over), LIMITS)


@pytest.mark.parametrize(
    "bad_part",
    [[part(3)], part(3, sha256=b"short"), {**part(3), "size": "3"}, {"size": 3}],
    ids=["a list", "short sha256", "size not int", "fields missing"],
)
def test_put_part_must_be_one_part_map(bad_part: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(put(part=bad_part), LIMITS)


def test_put_part_over_max_partition_is_too_large_with_rid() -> None:
    with pytest.raises(RequestError) as info:
        parse_client_frame(put(part=part(LIMITS.max_partition + 1)), LIMITS)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 12


def test_put_data_must_be_bin() -> None:
    with pytest.raises(FrameError):
        parse_client_frame(put(data="abc"), LIMITS)


def test_upload_at_max_parts_is_accepted() -> None:
    parts = [part(1)] * LIMITS.max_parts
    parsed = parse_client_frame(upload(parts=parts), LIMITS)
    assert isinstance(parsed, Upload)
    assert len(parsed.parts) == LIMITS.max_parts


def test_more_than_max_parts_is_too_large_with_rid() -> None:
    with pytest.raises(RequestError) as info:
        parse_client_frame(upload(rid=77, parts=[part(1)] * (LIMITS.max_parts + 1)), LIMITS)
    assert not isinstance(info.value, ProtocolViolation)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 77


@pytest.mark.parametrize("size", [0, LIMITS.max_partition + 1, frames.MAX_ID])
def test_part_size_out_of_range_is_too_large(size: int) -> None:
    with pytest.raises(RequestError) as info:
        parse_client_frame(upload(rid=78, parts=[part(10), part(size)]), LIMITS)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 78
    assert info.value.part == 1


@pytest.mark.parametrize("size", [1, LIMITS.max_partition])
def test_part_size_bounds_are_inclusive(size: int) -> None:
    parsed = parse_client_frame(upload(parts=[part(size)]), LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.parts[0].size == size


@pytest.mark.parametrize("size", [-1, True, 1.0, "10", None])
def test_part_size_of_wrong_type_or_negative_is_a_frame_error(size: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=[part(size)]), LIMITS)


@pytest.mark.parametrize(
    "sha",
    [b"", b"x" * 31, b"x" * 33, b"x" * 64, "x" * 32, SHA.hex(), None, 32],
    ids=["empty", "31", "33", "64", "str32", "hex-str", "nil", "int"],
)
def test_sha256_must_be_exactly_32_bytes(sha: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=[part(10, sha256=sha)]), LIMITS)


@pytest.mark.parametrize("missing", ["size", "sha256", "key", "salt"])
def test_part_missing_field_is_a_frame_error(missing: str) -> None:
    p = part(10)
    del p[missing]
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=[p]), LIMITS)


@pytest.mark.parametrize("item", [None, 1, b"x", "x", [10, SHA, b"k", b"s"]], ids=repr)
def test_part_must_be_a_map(item: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=[part(10), item]), LIMITS)


@pytest.mark.parametrize("parts", [None, {}, "parts", b"", 0, {"0": part(1)}], ids=repr)
def test_parts_must_be_a_list(parts: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=parts), LIMITS)


@pytest.mark.parametrize("meta", [None, [], b"meta", "meta", 1], ids=repr)
def test_meta_must_be_a_map(meta: object) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(meta=meta), LIMITS)


def test_meta_keys_must_be_strings() -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(meta={**META, 1: b"x"}), LIMITS)


@pytest.mark.parametrize("missing", ["name", "mtime", "key", "salt"])
def test_meta_missing_field_is_a_frame_error(missing: str) -> None:
    meta = dict(META)
    del meta[missing]
    with pytest.raises(FrameError):
        parse_client_frame(upload(meta=meta), LIMITS)


@pytest.mark.parametrize("field", ["name", "mtime", "key", "salt"])
def test_meta_field_must_be_bytes_not_str(field: str) -> None:
    with pytest.raises(FrameError):
        parse_client_frame(upload(meta={**META, field: "text"}), LIMITS)


@pytest.mark.parametrize("field", ["sha256", "key", "salt"])
def test_part_bytes_field_must_be_bytes_not_str(field: str) -> None:
    value = "x" * 32 if field == "sha256" else "text"
    with pytest.raises(FrameError):
        parse_client_frame(upload(parts=[part(10, **{field: value})]), LIMITS)


_meta_caps = [
    ("name", frames.MAX_NAME),
    ("mtime", frames.MAX_MTIME),
    ("key", frames.MAX_KEY),
    ("salt", frames.MAX_SALT),
]


@pytest.mark.parametrize(("field", "cap"), _meta_caps, ids=[f for f, _ in _meta_caps])
def test_meta_bytes_caps(field: str, cap: int) -> None:
    at_cap = parse_client_frame(upload(meta={**META, field: b"x" * cap}), LIMITS)
    assert isinstance(at_cap, Upload)
    assert getattr(at_cap.meta, field) == b"x" * cap
    with pytest.raises(RequestError) as info:
        parse_client_frame(upload(rid=90, meta={**META, field: b"x" * (cap + 1)}), LIMITS)
    assert not isinstance(info.value, ProtocolViolation)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 90


_part_caps = [("key", frames.MAX_KEY), ("salt", frames.MAX_SALT)]


@pytest.mark.parametrize(("field", "cap"), _part_caps, ids=[f for f, _ in _part_caps])
def test_part_bytes_caps(field: str, cap: int) -> None:
    at_cap = parse_client_frame(upload(parts=[part(10, **{field: b"x" * cap})]), LIMITS)
    assert isinstance(at_cap, Upload)
    assert getattr(at_cap.parts[0], field) == b"x" * cap
    with pytest.raises(RequestError) as info:
        parse_client_frame(upload(rid=91, parts=[part(10, **{field: b"x" * (cap + 1)})]), LIMITS)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.rid == 91


def test_upload_size_is_the_sum_of_part_sizes() -> None:
    parsed = parse_client_frame(upload(parts=[part(1), part(2), part(4000)]), LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.size == 4003


# ------------------------------------------------------------ unknown types


@pytest.mark.parametrize(
    ("rid", "expected"),
    [
        (5, 5),
        (0, 0),
        (frames.MAX_ID, frames.MAX_ID),
        (frames.MAX_ID + 1, None),
        (-1, None),
        (True, None),
        (False, None),
        ("5", None),
        (5.0, None),
        (None, None),
        (b"5", None),
    ],
    ids=repr,
)
def test_unknown_type_carries_a_valid_rid_only(rid: object, expected: int | None) -> None:
    with pytest.raises(UnknownFrameType) as info:
        parse_client_frame({"t": "teleport", "rid": rid}, LIMITS)
    assert info.value.rid == expected
    assert info.value.code == ErrorCode.UNKNOWN_TYPE
    assert info.value.frame_type == "teleport"


def test_unknown_type_without_rid() -> None:
    with pytest.raises(UnknownFrameType) as info:
        parse_client_frame({"t": "teleport"}, LIMITS)
    assert info.value.rid is None


@pytest.mark.parametrize("t", ["", "Hello", "PING", "welcome", "error", "change", "hello "])
def test_unknown_type_is_a_request_error_not_a_violation(t: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_client_frame({"t": t, "rid": 1}, LIMITS)
    assert isinstance(info.value, UnknownFrameType)
    assert not isinstance(info.value, ProtocolViolation)
    assert frames.error_from(info.value) == {
        "t": "error",
        "code": "unknown_type",
        "msg": f"unknown frame type {t!r}",
        "retry": False,
        "rid": 1,
    }


# ------------------------------------------------------------ server frames


def test_welcome() -> None:
    frame = frames.welcome("sess-1", 3, "dev-1", 99, LIMITS)
    assert frame == {
        "t": "welcome",
        "v": 1,
        "session": "sess-1",
        "user": 3,
        "device": "dev-1",
        "head": 99,
        "limits": {
            "max_frame": LIMITS.max_frame,
            "max_chunk": LIMITS.max_chunk,
            "max_partition": LIMITS.max_partition,
            "max_parts": LIMITS.max_parts,
            "window": LIMITS.window,
        },
    }


_BUILT: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "welcome",
        frames.welcome("s", 1, "d", 0, Limits()),
        {"t": "welcome", "v": 1, "session": "s", "user": 1, "device": "d", "head": 0,
         "limits": Limits().as_map()},
    ),
    (
        "upload_ok",
        frames.upload_ok(1, "u-1", [0, 2]),
        {"t": "upload_ok", "rid": 1, "upload": "u-1", "have": [0, 2]},
    ),
    (
        "upload_ok-empty",
        frames.upload_ok(1, "u-1", []),
        {"t": "upload_ok", "rid": 1, "upload": "u-1", "have": []},
    ),
    ("credit", frames.credit(4096), {"t": "credit", "bytes": 4096}),
    ("part_ok", frames.part_ok("u-1", 3), {"t": "part_ok", "upload": "u-1", "part": 3}),
    (
        "committed",
        frames.committed(2, 7, 4, 1000),
        {"t": "committed", "rid": 2, "object": 7, "rev": 4, "seq": 1000},
    ),
    ("ok", frames.ok(3), {"t": "ok", "rid": 3}),
    ("pong", frames.pong(4), {"t": "pong", "rid": 4}),
    (
        "data",
        frames.data(5, 10, b"\x00payload", end=False),
        {"t": "data", "rid": 5, "off": 10, "data": b"\x00payload"},
    ),
    (
        "data-end",
        frames.data(5, 18, b"", end=True),
        {"t": "data", "rid": 5, "off": 18, "data": b"", "end": True},
    ),
    (
        "part_info",
        frames.part_info(
            6, id=9, object=7, size=100, sha256=SHA, key=b"k", salt=b"s", next=10
        ),
        {"t": "part_info", "rid": 6, "id": 9, "object": 7, "size": 100, "sha256": SHA,
         "key": b"k", "salt": b"s", "next": 10},
    ),
    (
        "part_info-last",
        frames.part_info(
            6, id=10, object=7, size=1, sha256=SHA, key=b"k", salt=b"s", next=None
        ),
        {"t": "part_info", "rid": 6, "id": 10, "object": 7, "size": 1, "sha256": SHA,
         "key": b"k", "salt": b"s", "next": None},
    ),
    ("expiring", frames.expiring(60), {"t": "expiring", "in": 60}),
    (
        "error",
        frames.error(ErrorCode.NOT_FOUND, rid=8),
        {"t": "error", "code": "not_found", "msg": "not found", "retry": False, "rid": 8},
    ),
    (
        "error-bad_offset",
        frames.error(ErrorCode.BAD_OFFSET, "wrong offset", upload="u-1", part=2, expected=512),
        {"t": "error", "code": "bad_offset", "msg": "wrong offset", "retry": False,
         "upload": "u-1", "part": 2, "expected": 512},
    ),
    (
        "error-incomplete",
        frames.error(ErrorCode.INCOMPLETE, rid=9, missing=[1, 3]),
        {"t": "error", "code": "incomplete", "msg": "incomplete", "retry": False, "rid": 9,
         "missing": [1, 3]},
    ),
    (
        "error-no-ids",
        frames.error(ErrorCode.UNAVAILABLE),
        {"t": "error", "code": "unavailable", "msg": "unavailable", "retry": True},
    ),
    (
        "error_from",
        frames.error_from(
            RequestError(ErrorCode.CONFLICT, "stale base", rid=12, rev=5)
        ),
        {"t": "error", "code": "conflict", "msg": "stale base", "retry": False, "rid": 12,
         "rev": 5},
    ),
    (
        "error_from-upload-part",
        frames.error_from(RequestError(ErrorCode.HASH_MISMATCH, upload="u-2", part=0)),
        {"t": "error", "code": "hash_mismatch", "msg": "hash mismatch", "retry": False,
         "upload": "u-2", "part": 0},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("name", "built", "expected"), _BUILT, ids=[n for n, _, _ in _BUILT])
def test_server_frame_builder(name: str, built: dict[str, Any], expected: dict[str, Any]) -> None:
    assert built == expected
    assert isinstance(built["t"], str)


@pytest.mark.parametrize(("name", "built", "expected"), _BUILT, ids=[n for n, _, _ in _BUILT])
def test_server_frame_survives_the_codec(
    name: str, built: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert decode(encode(built), Limits().max_frame) == expected


def test_data_frame_with_a_full_chunk_fits_in_max_frame() -> None:
    limits = Limits()
    frame = frames.data(frames.MAX_ID, frames.MAX_ID, b"x" * limits.max_chunk, end=True)
    message = encode(frame)
    assert len(message) <= limits.max_frame
    assert decode(message, limits.max_frame) == frame


@pytest.mark.parametrize("code", list(ErrorCode), ids=[c.value for c in ErrorCode])
def test_error_retry_only_for_unavailable_and_rate_limited(code: ErrorCode) -> None:
    frame = frames.error(code, rid=1)
    assert frame["retry"] is (code in (ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED))
    assert frame["code"] == code.value
    assert frame["msg"] == code.value.replace("_", " ")
    assert decode(encode(frame), 1024) == frame


def test_error_from_an_exception_raised_by_the_parser() -> None:
    with pytest.raises(RequestError) as info:
        parse_client_frame(upload(rid=33, parts=[part(0)]), LIMITS)
    frame = frames.error_from(info.value)
    assert frame["t"] == "error"
    assert frame["code"] == "too_large"
    assert frame["rid"] == 33
    assert frame["part"] == 0
    assert frame["retry"] is False
    assert isinstance(frame["msg"], str)
    assert frame["msg"]


# ------------------------------------------------------------------ limits


def test_default_limits_are_valid() -> None:
    Limits().validate()
    assert Limits().as_map() == {
        "max_frame": 2 * 1024 * 1024,
        "max_chunk": 1024 * 1024,
        "max_partition": 16 * 1024 * 1024,
        "max_parts": 10_000,
        "window": 8 * 1024 * 1024,
    }


def test_test_limits_are_valid() -> None:
    LIMITS.validate()


_LIMIT_FIELDS = ["max_frame", "max_chunk", "max_partition", "max_parts", "window"]


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1"], ids=repr)
@pytest.mark.parametrize("field", _LIMIT_FIELDS)
def test_limits_reject_non_positive_or_non_int(field: str, value: object) -> None:
    limits = Limits(**{**Limits().as_map(), field: value})
    with pytest.raises(ValueError, match=field):
        limits.validate()


def test_limits_max_frame_must_exceed_max_chunk_by_64_kib() -> None:
    Limits(max_frame=1000 + 64 * KiB, max_chunk=1000, window=1000).validate()
    with pytest.raises(ValueError, match="max_frame"):
        Limits(max_frame=1000 + 64 * KiB - 1, max_chunk=1000, window=1000).validate()


def test_limits_window_must_hold_a_chunk() -> None:
    Limits(max_frame=1000 + 64 * KiB, max_chunk=1000, window=1000).validate()
    with pytest.raises(ValueError, match="window"):
        Limits(max_frame=1000 + 64 * KiB, max_chunk=1000, window=999).validate()


# ---------------------------------------------------------------- properties
# Strategies shared with tests/test_protocol_connection.py.

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.integers(min_value=-3, max_value=10)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=40)
)
#: Anything msgpack can encode (maps with string keys, as frames have).
ANY = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _fields(draw: st.DrawFn, spec: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Each field: usually a plausible value, sometimes anything, sometimes absent."""
    out: dict[str, Any] = {}
    for name, plausible in spec.items():
        roll = draw(st.integers(min_value=0, max_value=19))
        if roll == 0:
            continue
        out[name] = draw(ANY) if roll == 1 else draw(plausible)
    return out


_int = st.integers(min_value=-1, max_value=20)
_text = st.text(min_size=1, max_size=10) | st.sampled_from(["", "x" * 65])
_bytes = st.binary(max_size=16)
_part_map = _fields(
    {
        "size": st.integers(min_value=0, max_value=LIMITS.max_partition + 1) | st.just(100),
        "sha256": st.binary(min_size=32, max_size=32) | st.binary(min_size=31, max_size=33),
        "key": _bytes | st.just(b"k" * (frames.MAX_KEY + 1)),
        "salt": _bytes,
    }
)
_meta_map = _fields(
    {
        "name": _bytes,
        "mtime": _bytes | st.just(b"m" * (frames.MAX_MTIME + 1)),
        "key": _bytes,
        "salt": _bytes,
    }
)
#: Plausible values for every field name a client frame uses.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "rid": _int | st.sampled_from([frames.MAX_ID, frames.MAX_ID + 1]),
    "upload": _text,
    "part": st.integers(min_value=-1, max_value=LIMITS.max_parts) | _part_map,
    "off": _int,
    "data": st.binary(max_size=3 * LIMITS.max_chunk // 2),
    "parts": st.lists(_part_map, max_size=LIMITS.max_parts + 1) | st.just([]),
    "meta": _meta_map,
    "size": _int,
    "sha256": st.binary(min_size=32, max_size=32),
    "key": _bytes,
    "salt": _bytes,
    "object": st.integers(min_value=0, max_value=9),
    "base": st.integers(min_value=0, max_value=9),
    "kind": st.sampled_from(["file", "dir", "file", "link"]),
    "token": _text,
    "device": _text,
    "cursor": _int,
    "v": st.integers(min_value=0, max_value=2),
}
_FIELDS_OF = {t: [n for n in raw if n != "t"] for t, (raw, _) in VALID.items()}


@st.composite
def random_frame(draw: st.DrawFn) -> dict[str, Any]:
    """A map with a `t` (a real client type or a random string) and plausible fields."""
    if draw(st.integers(min_value=0, max_value=4)):
        t = draw(st.sampled_from(sorted(frames.CLIENT_FRAME_TYPES)))
        names = _FIELDS_OF[t]
    else:
        t = draw(st.text(max_size=10))
        names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    frame = draw(_fields({name: FIELDS[name] for name in names}))
    extra = draw(
        st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6), ANY, max_size=2)
    )
    return {**extra, **frame, "t": t}


CLIENT_FRAME_CLASSES = (
    Hello, Ack, Upload, Put, Chunk, Commit, Resume, Abort, Delete, Get, Info, Ping, Reauth,
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(frame=random_frame())
def test_random_maps_only_raise_protocol_errors(frame: dict[str, Any]) -> None:
    message = msgpack.packb(frame, use_bin_type=True)
    try:
        parsed = parse_client_frame(decode(message, 1 << 20), LIMITS)
    except UnknownFrameType as exc:
        assert frame["t"] not in frames.CLIENT_FRAME_TYPES
        assert exc.rid is None or exc.rid == frame.get("rid")
    except RequestError as exc:
        assert exc.code == ErrorCode.TOO_LARGE
        assert frame["t"] in ("upload", "put")
        assert exc.rid == frame["rid"]
    except ProtocolViolation as exc:
        assert exc.code == CloseCode.PROTOCOL_VIOLATION
    except ProtocolError as exc:
        pytest.fail(f"unexpected ProtocolError subclass: {exc!r}")
    else:
        assert isinstance(parsed, CLIENT_FRAME_CLASSES)
        assert frame["t"] in frames.CLIENT_FRAME_TYPES
