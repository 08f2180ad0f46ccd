"""The reference model of one user's sync session(s), for the fuzz suite.

A *program* is a list of the operations below (frozen dataclasses, drawn by
hypothesis in ``tests/test_fuzz_session.py``). Ids in an operation are
*selectors*, resolved against the model when the operation runs, so a program
stays meaningful whatever ids the server hands out, and it shrinks well.

:class:`Model` holds what the server must hold (committed objects, uploads and
their received parts, the quota and the user's feed head) and what each live
session holds (the uploads opened on it, the part in progress per upload), and
predicts the exact reply of every request and chunk from the contract
(``docs/protocol.md``). It is pure: no I/O. Where the wire leaves an outcome
open (a request cut off by a dropped connection), the driver asks the database
once the server side of the session has ended and the model adopts the answer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------- operations
# Selectors: ``upload``/``obj``/``part`` (of Get/Info) index, modulo its length,
# the driver's list of what the model knows (newest first; for uploads, those
# open on this session first); -1 picks a bogus id and -2 another user's.


@dataclass(frozen=True)
class Declare:
    """``upload``: a new object (``target`` None) or a new revision of a known one."""

    slot: int = 0
    target: int | None = None
    base: str = "right"  # right | stale | ahead
    kind: str = "file"  # file | dir | flip (the other kind than the object's)
    sizes: tuple[int, ...] = (1,)
    seed: int = 0
    flaw: str | None = None  # a field over its cap: see FLAWS
    drop: bool = False  # drop the connection right after sending (see ``after``)
    after: float = 0.0  # seconds between sending and dropping: where the cut lands


@dataclass(frozen=True)
class Put:
    """``put``: a one-part file in one frame, new (``target`` None) or a new revision."""

    slot: int = 0
    target: int | None = None
    base: str = "right"  # right | stale | ahead
    size: int = 1  # up to max_chunk: the data travels in the frame
    seed: int = 0
    corrupt: bool = False  # part.sha256 is not the data's: hash_mismatch
    resend: bool = False  # the previous put again: same id, same bytes
    drop: bool = False
    after: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """One chunk of a part."""

    slot: int = 0
    upload: int = 0
    part: int = 0
    off: str = "right"  # right | zero | ahead | behind
    size: int = 1  # bytes of data; past the part's end overflows; > max_chunk: too_large
    corrupt: bool = False


@dataclass(frozen=True)
class SendPart:
    """The rest of a part from where the server is, in chunks of ``chunk`` bytes."""

    slot: int = 0
    upload: int = 0
    part: int = 0
    chunk: int = 4096
    corrupt: bool = False
    wait: bool = True  # False: do not wait for part_ok (commit or drop may follow)
    resume: bool = True  # resume first when the upload is open but not on this session


@dataclass(frozen=True)
class SendAll:
    """Every part not yet stored, chunks interleaved across parts (a client's push)."""

    slot: int = 0
    upload: int = 0
    chunk: int = 4096
    corrupt: int | None = None  # index of a part sent with one byte flipped
    wait: bool = True
    resume: bool = True


@dataclass(frozen=True)
class _OnUpload:
    """A request naming one upload (``upload`` selects it), maybe cut off by a drop."""

    slot: int = 0
    upload: int = 0
    drop: bool = False
    after: float = 0.0


class Commit(_OnUpload):
    """``commit``."""


class Resume(_OnUpload):
    """``resume``."""


class Abort(_OnUpload):
    """``abort``."""


@dataclass(frozen=True)
class Delete:
    slot: int = 0
    obj: int = 0
    base: str = "right"
    drop: bool = False
    after: float = 0.0


@dataclass(frozen=True)
class Get:
    slot: int = 0
    part: int = 0
    off: str = "zero"  # zero | mid | end | past


@dataclass(frozen=True)
class Info:
    slot: int = 0
    part: int = 0


@dataclass(frozen=True)
class Ping:
    slot: int = 0


@dataclass(frozen=True)
class Unknown:
    """A frame of a type the server does not know: ``unknown_type``, session stays."""

    slot: int = 0
    rid: bool = True


@dataclass(frozen=True)
class Violation:
    """Something that is not a valid frame: the server closes the session."""

    slot: int = 0
    kind: str = "not_msgpack"


@dataclass(frozen=True)
class Drop:
    slot: int = 0
    abrupt: bool = True  # True: the socket vanishes (no close handshake)


Op = (
    Declare
    | Put
    | Chunk
    | SendPart
    | SendAll
    | Commit
    | Resume
    | Abort
    | Delete
    | Get
    | Info
    | Ping
    | Unknown
    | Violation
    | Drop
)

#: Declaration flaws answered with ``too_large`` (the session stays open).
FLAWS = ("too_many_parts", "part_too_big", "zero_part", "name_too_big", "key_too_big")

#: Violations and the close code each must get.
VIOLATIONS: dict[str, int] = {
    "not_msgpack": 4400,
    "not_a_map": 4400,
    "no_t": 4400,
    "int_key": 4400,
    "float_rid": 4400,
    "bool_rid": 4400,
    "missing_field": 4400,
    "second_hello": 4400,
    "ext_type": 4400,
    "str_for_bin": 4400,
    "short_sha": 4400,
    "dir_with_parts": 4400,
    "object_without_base": 4400,
    "negative_off": 4400,
    "part_index": 4400,
    "over_credit": 4400,
    "text": 1003,
    "oversize": 1009,
}

BOGUS_UPLOAD = "bogus-upload-0000000000"
BOGUS_ID = 1 << 62


# ------------------------------------------------------------------ data


def blob(seed: int, index: int, size: int) -> bytes:
    """Deterministic bytes: everything a program sends derives from its draws."""
    return random.Random(seed * 7919 + index).randbytes(size)


@dataclass(frozen=True)
class PartData:
    data: bytes
    key: bytes
    salt: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()

    def spec(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "key": self.key, "salt": self.salt}


def make_parts(seed: int, sizes: tuple[int, ...]) -> list[PartData]:
    return [
        PartData(blob(seed, i, size), b"pk-%d-%d" % (seed, i), blob(seed, 1000 + i, 12))
        for i, size in enumerate(sizes)
    ]


def make_meta(seed: int) -> dict[str, bytes]:
    return {
        "name": b"name-%d" % seed,
        "mtime": b"mtime-%d" % seed,
        "key": b"key-%d" % seed,
        "salt": blob(seed, 999, 16),
    }


# ----------------------------------------------------------------- state


@dataclass
class MObject:
    id: int
    kind: str
    rev: int
    status: str
    meta: dict[str, bytes]
    parts: list[PartData]
    part_ids: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts) if self.status == "active" else 0


@dataclass
class MUpload:
    id: str
    obj: int | None
    base: int | None
    kind: str
    meta: dict[str, bytes]
    parts: list[PartData]
    state: str = "open"  # open | committed | aborted
    received: set[int] = field(default_factory=set)
    result: tuple[int, int, int] | None = None  # (object, rev, seq) once committed

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


@dataclass
class MRecord:
    """An upload opened on one session: what the server keeps per session."""

    received: set[int] = field(default_factory=set)
    #: Part index -> bytes accepted so far on this session (a part in progress).
    writers: dict[int, bytearray] = field(default_factory=dict)


@dataclass
class MSession:
    records: dict[str, MRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """An expected terminal reply: ``t`` and the fields that must match exactly."""

    t: str
    fields: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def error(code: str, **extra: Any) -> Reply:
        return Reply("error", {"code": code, **extra})


@dataclass(frozen=True)
class ChunkOutcome:
    """What one chunk does: refused now (``error``), accepted, or completes its part."""

    error: Reply | None = None
    complete: bool = False
    matches: bool = False  # the completed part hashes to its declaration
    closed: bool = False  # the upload is no longer open (committed or aborted elsewhere)


class Model:
    def __init__(self, *, quota: int, max_chunk: int, max_parts: int, max_partition: int) -> None:
        self.quota = quota
        self.max_chunk = max_chunk
        self.max_parts = max_parts
        self.max_partition = max_partition
        self.objects: dict[int, MObject] = {}
        self.uploads: dict[str, MUpload] = {}
        self.seq = 0
        #: Partition ids of superseded revisions and deleted objects.
        self.retired: list[int] = []
        #: Every (object, rev, status) a commit or delete reported.
        self.history: set[tuple[int, int, str]] = set()

    # ----------------------------------------------------------- queries

    @property
    def used(self) -> int:
        return sum(o.size for o in self.objects.values())

    @property
    def reserved(self) -> int:
        return sum(u.size for u in self.uploads.values() if u.state == "open")

    def live_parts(self) -> list[int]:
        return [
            pid
            for o in reversed(self.objects.values())
            if o.status == "active"
            for pid in o.part_ids
        ]

    def find_part(self, pid: int) -> tuple[MObject, int] | None:
        for o in self.objects.values():
            if o.status == "active" and pid in o.part_ids:
                return o, o.part_ids.index(pid)
        return None

    # ------------------------------------------------------- predictions

    def declare(
        self, obj: int | None, base: int | None, kind: str, parts: list[PartData], flaw: str | None
    ) -> Reply:
        if flaw is not None:
            return Reply.error("too_large")
        replaced = 0
        if obj is not None:
            o = self.objects.get(obj)
            if o is None:
                return Reply.error("not_found")
            if o.kind != kind or o.rev != base:
                return Reply.error("conflict", rev=o.rev)
            replaced = o.size
        # Unfinished uploads reserve their declared size (docs §4.1).
        if self.used + self.reserved - replaced + sum(p.size for p in parts) > self.quota:
            return Reply.error("quota_exceeded")
        return Reply("upload_ok", {"have": []})

    def chunk(self, sess: MSession, upload: str, part: int, off: int, data: bytes) -> ChunkOutcome:
        """The server's per-chunk rules (docs/protocol.md §4.2-4.4), applied to ``sess``."""

        def refuse(code: str, **extra: Any) -> ChunkOutcome:
            return ChunkOutcome(error=Reply.error(code, upload=upload, part=part, **extra))

        if len(data) > self.max_chunk:
            return refuse("too_large")
        rec = sess.records.get(upload)
        if rec is None:
            return refuse("not_found")
        up = self.uploads[upload]
        if part >= len(up.parts):
            return refuse("not_found")
        size = up.parts[part].size
        if part in rec.received:
            return refuse("bad_offset", expected=size)
        got = rec.writers.get(part)
        expected = len(got) if got is not None else 0
        if off != expected:
            return refuse("bad_offset", expected=expected)
        if off + len(data) > size:
            rec.writers.pop(part, None)
            return refuse("too_large")
        got = rec.writers.setdefault(part, bytearray())
        got += data
        if len(got) < size:
            return ChunkOutcome()
        del rec.writers[part]
        return ChunkOutcome(
            complete=True,
            matches=bytes(got) == up.parts[part].data,
            closed=up.state != "open",
        )

    def part_stored(self, sess: MSession | None, upload: str, part: int) -> None:
        """A ``part_ok`` arrived (or the database says the part is stored)."""
        up = self.uploads[upload]
        if up.state == "open":
            up.received.add(part)
        if sess is not None and upload in sess.records:
            sess.records[upload].received.add(part)

    def commit(self, upload: str) -> Reply:
        up = self.uploads.get(upload)
        if up is None or up.state == "aborted":
            return Reply.error("not_found")
        if up.state == "committed":
            assert up.result is not None
            obj, rev, seq = up.result
            return Reply("committed", {"object": obj, "rev": rev, "seq": seq})
        missing = sorted(set(range(len(up.parts))) - up.received)
        if missing:
            return Reply.error("incomplete", missing=missing)
        replaced = 0
        if up.obj is not None:
            o = self.objects[up.obj]
            if o.rev != up.base:
                return Reply.error("conflict", rev=o.rev)
            replaced = o.size
        delta = up.size - replaced
        if delta > 0 and self.used + delta > self.quota:
            return Reply.error("quota_exceeded")
        fields: dict[str, Any] = {"rev": 1 if up.obj is None else (up.base or 0) + 1}
        if up.obj is not None:
            fields["object"] = up.obj
        fields["seq"] = self.seq + 1
        return Reply("committed", fields)

    def put(
        self, upload: str, obj: int | None, base: int | None, part: PartData, corrupt: bool
    ) -> Reply:
        """docs §4.10: hash first, then the id (a committed put's result), then as a
        declaration and its commit in one."""
        if corrupt:
            return Reply.error("hash_mismatch", upload=upload)
        up = self.uploads.get(upload)
        if up is not None and up.state == "committed":
            assert up.result is not None
            o, rev, seq = up.result
            return Reply("committed", {"object": o, "rev": rev, "seq": seq})
        if up is not None and up.state == "open":
            # A revision put cut off after its declaration: the resend stores the
            # part and commits the upload.
            held = set(up.received)
            up.received.add(0)
            try:
                return self.commit(upload)
            finally:
                up.received = held
        replaced = 0
        if obj is not None:
            o = self.objects.get(obj)
            if o is None:
                return Reply.error("not_found")
            if o.kind != "file" or o.rev != base:
                return Reply.error("conflict", rev=o.rev)
            replaced = o.size
        if self.used + self.reserved - replaced + part.size > self.quota:
            return Reply.error("quota_exceeded")
        fields: dict[str, Any] = {"rev": 1 if obj is None else (base or 0) + 1}
        if obj is not None:
            fields["object"] = obj
        fields["seq"] = self.seq + 1
        return Reply("committed", fields)

    def delete(self, obj: int, base: int) -> Reply:
        o = self.objects.get(obj)
        if o is None or o.status == "deleted":
            return Reply.error("not_found")
        if o.rev != base:
            return Reply.error("conflict", rev=o.rev)
        return Reply("committed", {"object": obj, "rev": o.rev + 1, "seq": self.seq + 1})

    # ----------------------------------------------------------- updates

    def add_upload(self, up: MUpload, sess: MSession | None) -> None:
        self.uploads[up.id] = up
        if sess is not None:
            sess.records[up.id] = MRecord()

    def apply_commit(self, upload: str, obj: int, rev: int, seq: int) -> MObject:
        up = self.uploads[upload]
        if up.obj is None:
            assert obj not in self.objects, f"commit reused object id {obj}"
            o = MObject(obj, up.kind, rev, "active", up.meta, list(up.parts))
            self.objects[obj] = o
        else:
            o = self.objects[obj]
            self.retired.extend(o.part_ids)
            o.rev, o.status, o.meta, o.parts, o.part_ids = (
                rev,
                "active",
                up.meta,
                list(up.parts),
                [],
            )
        up.state, up.result = "committed", (obj, rev, seq)
        self.seq = seq
        self.history.add((obj, rev, "active"))
        return o

    def apply_delete(self, obj: int, rev: int, seq: int) -> None:
        o = self.objects[obj]
        self.retired.extend(o.part_ids)
        o.rev, o.status, o.parts, o.part_ids = rev, "deleted", [], []
        self.seq = seq
        self.history.add((obj, rev, "deleted"))

    def apply_abort(self, upload: str) -> None:
        up = self.uploads.get(upload)
        if up is not None and up.state == "open":
            up.state = "aborted"
            up.received.clear()


def drop_upload(sess: MSession, upload: str) -> None:
    """The server's ``_drop_upload``: the session forgets the upload and its parts in progress."""
    sess.records.pop(upload, None)
