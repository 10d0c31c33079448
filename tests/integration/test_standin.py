"""The stand-in Open WebUI itself, without a proxy: if these fail, proxy test failures mean
nothing. Fast (about a second) and target-independent."""

import asyncio
import hashlib
import json

import httpx
import websockets

from helpers import pattern_sha256


def test_standin_endpoints(upstream):
    with httpx.Client(base_url=f"http://127.0.0.1:{upstream.port}", trust_env=False) as c:
        r = c.get("/health")
        assert r.json()["status"] is True and r.headers["x-standin"] == "main"
        assert "<script>" in c.get("/").text
        assert c.get("/api/config").json()["standin"] == "main"
        e = c.post("/echo?a=1", content=b"abc").json()
        assert (e["body_len"], e["body_sha256"]) == (3, hashlib.sha256(b"abc").hexdigest())
        assert e["query"] == "a=1" and e["peer"][1] > 0
        for chunked in (0, 1):
            r = c.get(f"/download?size=300000&chunked={chunked}")
            assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(300000)
            assert ("content-length" in r.headers) == (not chunked)
        r = c.get("/slow?seconds=0.2&size=1000")
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(1000)
        r = c.get("/api/v1/files", headers={"Host": "localhost:9443",
                                             "X-Forwarded-Proto": "https"})
        assert r.status_code == 307
        assert r.headers["location"] == "https://localhost:9443/api/v1/files/"
        r = c.post("/api/v1/files/", files={"file": ("a.txt", b"x" * 5000)})
        assert r.json()["size"] == 5000
        r = c.post("/api/chat/completions", json={"tokens": 3, "gap": 0})
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert len(events) == 4 and events[-1] == "[DONE]"
        r = c.post("/ollama/api/pull?steps=2&gap=0")
        assert json.loads(r.text.splitlines()[-1])["status"] == "success"


def test_standin_socketio_websocket(upstream):
    async def run():
        url = f"ws://127.0.0.1:{upstream.port}/ws/socket.io/?EIO=4&transport=websocket"
        async with websockets.connect(url) as ws:
            assert ws.response_headers.get("x-standin") == "main"
            assert (await ws.recv()).startswith("0{")  # engine.io open
            await ws.send("40")  # socket.io connect
            assert (await ws.recv()).startswith("40")
            await ws.send('42["chat",{"n":3,"gap":0.01}]')
            got = [await ws.recv() for _ in range(4)]
        assert [json.loads(m[2:])[0] for m in got] == ["delta"] * 3 + ["done"]

    asyncio.run(asyncio.wait_for(run(), 10))
