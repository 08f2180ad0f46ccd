"""GET /metrics: Prometheus text with the node's counts, and nothing about any user."""

from __future__ import annotations

import os

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import unique
from tests.support.client import SyncClient, register_login


async def scrape(http: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=http) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def test_metrics_count_the_work_of_the_node(server, alice):
    before = await scrape(server.http)
    client = await SyncClient.connect(server.ws, alice["access"], device="metered")
    data = os.urandom(5000)
    done = await client.push([data])
    change = await client.wait_for(lambda f: f["t"] == "change" and f["seq"] == done["seq"])
    got = await client.download(change["parts"][0]["id"])
    missing = await client.request({"t": "commit", "upload": "no-such-upload-0000000"})
    assert missing["code"] == "not_found"
    auth = {"Authorization": f"Bearer {alice['access']}"}
    async with httpx.AsyncClient(base_url=server.http, headers=auth) as http:
        assert (await http.get("/v1/object/999999999")).status_code == 404
    after = await scrape(server.http)
    await client.close()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert after[("tessera_sessions", ())] >= 1
    assert grew("tessera_sessions_opened_total") >= 1
    assert grew("tessera_commits_total") >= 1
    assert grew("tessera_upload_bytes_total") >= len(data)
    assert grew("tessera_changes_sent_total") >= 1
    assert grew("tessera_feed_queries_total") >= 1
    assert grew("tessera_download_bytes_total") >= len(got) == len(data)
    assert grew("tessera_errors_total", transport="ws", code="not_found") >= 1
    assert grew("tessera_errors_total", transport="rest", code="not_found") >= 1
    assert after[("tessera_listener_up", ())] == 1
    assert after[("tessera_db_connections", (("state", "busy"),))] >= 0
    assert after[("process_resident_memory_bytes", ())] > 0


async def test_metrics_name_no_user(server):
    name = unique("secretive")
    tokens = await register_login(server.http, name)
    client = await SyncClient.connect(server.ws, tokens["access"], device="private-device")
    await client.push([b"x"])
    async with httpx.AsyncClient(base_url=server.http) as http:
        text = (await http.get("/metrics")).text
    await client.close()
    assert name not in text and "private-device" not in text


async def test_error_frames_sent_outside_a_request_reply_are_counted(server, alice):
    """An error the receive loop answers itself (here ``unknown_type``) counts like
    a request's error reply."""
    before = await scrape(server.http)
    client = await SyncClient.connect(server.ws, alice["access"], device="metered")
    reply = await client.request({"t": "no-such-frame-type"})
    assert reply["code"] == "unknown_type"
    after = await scrape(server.http)
    await client.close()
    key = ("tessera_errors_total", (("code", "unknown_type"), ("transport", "ws")))
    assert after[key] - before.get(key, 0.0) == 1
