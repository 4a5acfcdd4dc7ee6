"""Issue 14 item 6: --max-sessions under concurrency. 60 remote creates at once against a
limit of 4 make exactly 4 sessions (the slot is taken before the first await), and
creates that fail give their slot back."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.security.rest_util import AUTH, MiB, Watch, start_agent


async def create_many(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/sessions", json=b) for b in bodies))


def active(agent: Any) -> list[dict[str, Any]]:
    sessions = agent.request("GET", "/v1/sessions", headers=AUTH).json()["sessions"]
    return [s for s in sessions if s["state"] in ("awaiting_attach", "running", "paused")]


def test_sixty_concurrent_remote_creates_make_at_most_four(tmp_path: Path, image) -> None:  # type: ignore[no-untyped-def]
    img = image(4 * MiB)
    source = start_agent(tmp_path, "src")
    dest = start_agent(tmp_path, "dst", extra=["--max-sessions", "4"])
    try:
        r = source.request(
            "POST", "/v1/exports", json={"name": "img", "path": str(img)}, headers=AUTH
        )
        assert r.status_code == 201, r.text
        good = {"source": {"peer": source.grpc, "export": "img"}, "attach_timeout_s": 120}
        with Watch(dest) as watch:
            responses = asyncio.run(create_many(dest.url, [good] * 60))
        codes = Counter(
            (r.status_code, (r.json().get("error") or {}).get("code")) for r in responses
        )
        print("60 concurrent remote creates, limit 4:", dict(codes), watch.figures())
        assert codes[(201, None)] == 4, codes
        assert codes[(429, "too_many_sessions")] == 56, codes
        assert len(active(dest)) == 4
        watch.assert_healthy(rss_growth=64 * MiB)

        # every failure path gives the slot back: unknown exports, then the limit again
        for s in active(dest):
            assert (
                dest.request("DELETE", f"/v1/sessions/{s['id']}", headers=AUTH).status_code == 200
            )
        bad = {"source": {"peer": source.grpc, "export": "missing"}}
        responses = asyncio.run(create_many(dest.url, [bad] * 20))
        seen = Counter((r.status_code, r.json()["error"]["code"]) for r in responses)
        # at most 4 creates are under way at once; the others are refused at the door
        assert set(seen) <= {(404, "export_not_found"), (429, "too_many_sessions")}, seen
        assert seen[(404, "export_not_found")] >= 4, seen
        responses = asyncio.run(create_many(dest.url, [good] * 12))
        assert sorted(r.status_code for r in responses) == [201] * 4 + [429] * 8
        assert len(active(dest)) == 4
    finally:
        dest.stop()
        source.stop()
