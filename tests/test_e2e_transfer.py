"""Uploads and downloads end to end: real server, real PostgreSQL, both real stores."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os

import httpx

from server.stores.local import READ_AHEAD
from tests.support.client import SyncClient, meta, part_spec, register_login

PART = 300_000  # bytes; several chunks of 64 KiB each


def random_parts(sizes: list[int]) -> list[bytes]:
    return [os.urandom(n) for n in sizes]


async def fetch_rest(http: str, token: str, part: int, headers: dict[str, str] | None = None):
    async with httpx.AsyncClient(base_url=http, follow_redirects=True) as client:
        return await client.get(
            f"/v1/partition/{part}", headers={"Authorization": f"Bearer {token}", **(headers or {})}
        )


async def test_interleaved_upload_then_download_ws_and_rest(make_server, store_kind):
    server = make_server(store_kind)
    tokens = await register_login(server.http, f"u-{os.urandom(4).hex()}")
    client = await SyncClient.connect(server.ws, tokens["access"])
    parts = random_parts([PART, PART, 123_457, 1])
    ok = await client.start_upload(parts)
    assert ok["t"] == "upload_ok" and ok["have"] == []
    await client.send_parts(ok["upload"], parts)  # chunks of all four parts interleaved
    done = await client.request({"t": "commit", "upload": ok["upload"]})
    assert done["t"] == "committed" and done["rev"] == 1 and done["seq"] >= 1

    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(
            f"/v1/object/{done['object']}",
            headers={"Authorization": f"Bearer {tokens['access']}"},
        )
    assert r.status_code == 200
    listed = r.json()["parts"]
    assert [p["size"] for p in listed] == [len(p) for p in parts]
    ids = [p["id"] for p in listed]

    for part_id, data in zip(ids, parts, strict=True):
        assert await client.download(part_id) == data
        rest = await fetch_rest(server.http, tokens["access"], part_id)
        assert rest.status_code == 200
        assert rest.content == data

    # info walks the linked list in file order.
    info = await client.request({"t": "info", "part": ids[0]})
    chain = [info]
    while chain[-1]["next"] is not None:
        chain.append(await client.request({"t": "info", "part": chain[-1]["next"]}))
    assert [i["id"] for i in chain] == ids
    assert [i["sha256"] for i in chain] == [hashlib.sha256(p).digest() for p in parts]
    assert all(i["object"] == done["object"] for i in chain)
    await client.close()


async def test_download_from_offset_and_rest_ranges(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    data = os.urandom(200_000)
    done = await client.push([data])
    obj = await client_object(server, alice, done["object"])
    part = obj["parts"][0]["id"]
    assert await client.download(part, off=150_000) == data[150_000:]
    assert await client.download(part, off=len(data)) == b""
    beyond = await client.request({"t": "get", "part": part, "off": len(data) + 1})
    assert beyond["t"] == "error" and beyond["code"] == "bad_offset"

    r = await fetch_rest(server.http, alice["access"], part, {"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    r = await fetch_rest(server.http, alice["access"], part, {"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]
    r = await fetch_rest(server.http, alice["access"], part, {"Range": "bytes=199990-"})
    assert r.status_code == 206 and r.content == data[199_990:]
    r = await fetch_rest(server.http, alice["access"], part, {"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(data)}"
    await client.close()


async def test_s3_rest_download_redirects_to_presigned_url(make_server):
    server = make_server("s3")
    tokens = await register_login(server.http, f"u-{os.urandom(4).hex()}")
    client = await SyncClient.connect(server.ws, tokens["access"])
    data = os.urandom(70_000)
    done = await client.push([data])
    obj = await client_object(server, tokens, done["object"])
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(
            f"/v1/partition/{obj['parts'][0]['id']}",
            headers={"Authorization": f"Bearer {tokens['access']}"},
        )
        assert r.status_code == 307
        location = r.headers["location"]
        assert server.settings.s3_endpoint in location and "X-Amz-Signature" in location
        fetched = await http.get(location)  # no credentials: the URL itself authorizes
        assert fetched.status_code == 200 and fetched.content == data
        ranged = await http.get(location, headers={"Range": "bytes=5-9"})
        assert ranged.status_code == 206 and ranged.content == data[5:10]
    await client.close()


async def client_object(server, tokens, obj: int) -> dict:
    async with httpx.AsyncClient(base_url=server.http) as http:
        r = await http.get(
            f"/v1/object/{obj}", headers={"Authorization": f"Bearer {tokens['access']}"}
        )
    assert r.status_code == 200, r.text
    return r.json()


async def test_resume_after_dropped_connection_on_new_session(make_server, store_kind):
    server = make_server(store_kind)
    tokens = await register_login(server.http, f"u-{os.urandom(4).hex()}")
    parts = random_parts([PART, PART, PART])
    first = await SyncClient.connect(server.ws, tokens["access"], device="laptop")
    ok = await first.start_upload(parts)
    upload = ok["upload"]
    await first.send_parts(upload, parts, indexes=[0])  # part 0 complete
    await first.send_chunk(upload, 1, 0, parts[1][:100_000])  # part 1 half sent
    await first.ws.close()  # the network goes away mid-part

    second = await SyncClient.connect(server.ws, tokens["access"], device="laptop")
    resumed = await second.request({"t": "resume", "upload": upload})
    assert resumed["t"] == "upload_ok" and resumed["have"] == [0]
    # Sending an already stored part again is refused, not duplicated.
    await second.send_chunk(upload, 0, 0, parts[0][:10])
    refused = await second.wait_for(lambda f: f["t"] == "error" and f.get("part") == 0)
    assert refused["code"] == "bad_offset" and refused["expected"] == PART
    await second.send_parts(upload, parts, indexes=[1, 2])
    done = await second.request({"t": "commit", "upload": upload})
    assert done["t"] == "committed"
    obj = await client_object(server, tokens, done["object"])
    got = [await second.download(p["id"]) for p in obj["parts"]]
    assert got == parts
    await second.close()


async def test_commit_is_idempotent_and_upload_is_then_closed(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    parts = random_parts([1000])
    ok = await client.start_upload(parts)
    await client.send_parts(ok["upload"], parts)
    first = await client.request({"t": "commit", "upload": ok["upload"]})
    again = await client.request({"t": "commit", "upload": ok["upload"]})
    assert again["t"] == "committed"
    assert (again["object"], again["rev"], again["seq"]) == (
        first["object"],
        first["rev"],
        first["seq"],
    )
    resumed = await client.request({"t": "resume", "upload": ok["upload"]})
    assert resumed["t"] == "error" and resumed["code"] == "not_found"
    await client.close()


async def test_new_revision_replaces_content_and_abort_discards(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    v1 = await client.push([b"version one"])
    v2 = await client.push([b"version two!"], obj=v1["object"], base=1)
    assert v2["rev"] == 2 and v2["object"] == v1["object"] and v2["seq"] > v1["seq"]
    obj = await client_object(server, alice, v1["object"])
    assert obj["rev"] == 2 and obj["size"] == len(b"version two!")
    assert await client.download(obj["parts"][0]["id"]) == b"version two!"

    ok = await client.start_upload([b"never committed"], obj=v1["object"], base=2)
    aborted = await client.request({"t": "abort", "upload": ok["upload"]})
    assert aborted == {"t": "ok", "rid": aborted["rid"]}
    gone = await client.request({"t": "commit", "upload": ok["upload"]})
    assert gone["t"] == "error" and gone["code"] == "not_found"
    assert (await client_object(server, alice, v1["object"]))["rev"] == 2

    deleted = await client.request({"t": "delete", "object": v1["object"], "base": 2})
    assert deleted["t"] == "committed" and deleted["rev"] == 3
    obj = await client_object(server, alice, v1["object"])
    assert obj["status"] == "deleted" and obj["parts"] == []
    await client.close()


async def test_empty_file_and_directory(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    empty = await client.push([])
    folder = await client.push([], kind="dir", name=b"enc-dir")
    for done, kind in ((empty, "file"), (folder, "dir")):
        obj = await client_object(server, alice, done["object"])
        assert obj["kind"] == kind and obj["size"] == 0 and obj["parts"] == []
    await client.close()


async def test_hello_catch_up_sends_compacted_changes_then_synced(server, alice):
    writer = await SyncClient.connect(server.ws, alice["access"], device="writer")
    a = await writer.push([b"a1"], name=b"name-a")
    await writer.push([b"a2"], obj=a["object"], base=1, name=b"name-a")
    b = await writer.push([b"b1"], name=b"name-b")
    await writer.close()

    reader = await SyncClient.connect(server.ws, alice["access"], device="reader", synced=False)
    changes = []
    while True:
        frame = await reader.next()
        if frame["t"] == "synced":
            break
        changes.append(frame)
    assert [c["t"] for c in changes] == ["change", "change"]
    assert [c["object"] for c in changes] == [a["object"], b["object"]]
    assert changes[0]["rev"] == 2 and changes[0]["origin"] == "writer"
    assert changes[0]["meta"]["name"] == b"name-a"
    assert [c["seq"] for c in changes] == sorted(c["seq"] for c in changes)
    assert frame["cursor"] == changes[-1]["seq"] == reader.welcome["head"]
    assert await reader.download(changes[0]["parts"][0]["id"]) == b"a2"

    # A cursor at the head gets nothing but synced.
    up_to_date = await SyncClient.connect(
        server.ws, alice["access"], device="reader", cursor=reader.welcome["head"], synced=False
    )
    assert (await up_to_date.next())["t"] == "synced"
    await reader.close()
    await up_to_date.close()


async def test_concurrent_downloads_interleave_and_control_frames_pass_data(make_server):
    server = make_server(max_chunk=64 * 1024, max_frame=128 * 1024)
    alice = await register_login(server.http, f"u-{os.urandom(4).hex()}")
    client = await SyncClient.connect(server.ws, alice["access"], small_buffers=True)
    # Large enough that kernel socket buffers cannot hold one whole download: on a
    # loaded machine the first could otherwise be sent in full before the second
    # read its first bytes (seen: 2 failures in 6 runs beside two busy loops).
    big = random_parts([12_000_000, 12_000_000])  # 184 data frames each
    done = await client.push(big)
    obj = await client_object(server, alice, done["object"])
    ids = [p["id"] for p in obj["parts"]]

    rids = [client.rid(), client.rid()]
    for rid, part in zip(rids, ids, strict=True):
        await client.send({"t": "get", "rid": rid, "part": part})
    ping = client.rid()
    await client.send({"t": "ping", "rid": ping})
    order: list[int] = []
    received = {rid: bytearray() for rid in rids}
    ended: set[int] = set()
    pong_at = None
    while len(ended) < 2:
        frame = await client.next()
        if frame["t"] == "pong":
            pong_at = len(order)
            continue
        if frame["t"] in ("credit", "change"):  # late credit, the upload's own change
            continue
        assert frame["t"] == "data"
        order.append(frame["rid"])
        received[frame["rid"]] += frame["data"]
        if frame.get("end"):
            ended.add(frame["rid"])
    assert [bytes(received[r]) for r in rids] == big
    # Frames already in socket buffers may precede it (how many depends on the
    # machine's load), but never a whole download: it is not queued behind data.
    first_end = min(len(order) - order[::-1].index(r) for r in rids)
    assert pong_at is not None and pong_at < first_end, (
        f"pong arrived after {pong_at} data frames, a download ended at {first_end}"
    )
    # Fairness: while both downloads are running, they take turns.
    both_from = max(order.index(r) for r in rids)
    both_until = min(len(order) - 1 - order[::-1].index(r) for r in rids)
    window = order[both_from : both_until + 1]
    assert len(window) > 20, f"downloads barely overlapped: {order}"
    # Round-robin alternates; a FIFO would send one download whole (184 frames).
    # Runs of one download are allowed: the scheduler is work-conserving when the
    # other has nothing ready, and with sends that copy nothing a store read
    # (READ_AHEAD at a time, in a worker thread) is often the slower side. Seen:
    # runs of 32 and 35 frames, one read plus the frames the outbox held. Allow
    # two reads, while the other's read is still in its thread, and those three.
    # (tests/test_outbox.py checks strict round-robin with frames always ready.)
    longest = max(len(list(run)) for _, run in itertools.groupby(window))
    assert longest <= 2 * (READ_AHEAD // (64 * 1024)) + 3, f"not interleaved: {window}"
    assert sum(1 for a, b in itertools.pairwise(window) if a != b) >= 2, window
    await client.close()


async def test_rest_upload_flow(make_server, store_kind):
    server = make_server(store_kind)
    tokens = await register_login(server.http, f"u-{os.urandom(4).hex()}")
    auth = {"Authorization": f"Bearer {tokens['access']}"}
    parts = random_parts([100_000, 5])
    specs = [part_spec(p) for p in parts]

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    body = {
        "kind": "file",
        "meta": {k: b64(v) for k, v in meta().items()},
        "parts": [
            {"size": s["size"], **{k: b64(s[k]) for k in ("sha256", "key", "salt")}} for s in specs
        ],
    }
    async with httpx.AsyncClient(base_url=server.http, headers=auth) as http:
        r = await http.post("/v1/upload", json=body)
        assert r.status_code == 201, r.text
        upload = r.json()["upload"]
        r = await http.put(f"/v1/upload/{upload}/part/0", content=parts[0])
        assert r.status_code == 200, r.text
        r = await http.post(f"/v1/upload/{upload}/commit")
        assert r.status_code == 409 and r.json()["error"]["code"] == "incomplete"
        assert r.json()["error"]["missing"] == [1]
        r = await http.put(f"/v1/upload/{upload}/part/1", content=b"wrong")
        assert r.status_code == 400 and r.json()["error"]["code"] == "hash_mismatch"
        r = await http.get(f"/v1/upload/{upload}")
        assert r.json()["have"] == [0]
        r = await http.put(f"/v1/upload/{upload}/part/1", content=parts[1])
        assert r.status_code == 200
        r = await http.post(f"/v1/upload/{upload}/commit")
        assert r.status_code == 200, r.text
        obj = r.json()["object"]
        r = await http.get(f"/v1/object/{obj}")
        ids = [p["id"] for p in r.json()["parts"]]
        listed = await http.get("/v1/object")
        assert obj in [o["object"] for o in listed.json()["objects"]]
    for part_id, data in zip(ids, parts, strict=True):
        r = await fetch_rest(server.http, tokens["access"], part_id)
        assert r.content == data


async def test_parallel_uploads_on_one_session(server, alice):
    client = await SyncClient.connect(server.ws, alice["access"])
    files = [random_parts([80_000, 40_000]) for _ in range(3)]
    oks = [await client.start_upload(f) for f in files]
    # Chunks of three uploads interleaved on one socket.
    offsets = {(u, i): 0 for u in range(3) for i in range(2)}
    while offsets:
        for (u, i), off in list(offsets.items()):
            piece = files[u][i][off : off + 16_384]
            await client.send_chunk(oks[u]["upload"], i, off, piece)
            if off + len(piece) >= len(files[u][i]):
                del offsets[(u, i)]
            else:
                offsets[(u, i)] = off + len(piece)
    rids = [client.rid() for _ in oks]
    for rid, ok in zip(rids, oks, strict=True):  # three commits in flight at once
        await client.send({"t": "commit", "rid": rid, "upload": ok["upload"]})
    commits = [await client.wait_for(lambda f, r=rid: f.get("rid") == r) for rid in rids]
    for done, parts in zip(commits, files, strict=True):
        assert done["t"] == "committed", done
        obj = await client_object(server, alice, done["object"])
        assert [await client.download(p["id"]) for p in obj["parts"]] == parts
    await client.close()
