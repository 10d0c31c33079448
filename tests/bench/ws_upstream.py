#!/usr/bin/python3
"""The socket.io upstream of the bench's `ws` metric, run the way Open WebUI runs its own:
python-socketio's AsyncServer in ASGI mode, websocket transport only, under uvicorn (with its
default websocket keep-alive pings, 20 s).  Any other path answers a small 200, which the
proxies' start check and warm-up ask for.

    ws_upstream.py PORT [PING_INTERVAL_S [PING_TIMEOUT_S]]      defaults 10 and 20

Open WebUI pings every 25 s; the bench uses 10 s so that a 60-s hold sees several pings.
With SIGUSR1 it prints one JSON line on stderr: websockets connected now and in all.
"""
import json
import resource
import signal
import sys

import socketio
import uvicorn

# One descriptor per websocket: raise the soft limit to the hard one (the bench raised that).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

port = int(sys.argv[1])
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
stats = {"now": 0, "total": 0}

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], ping_interval=interval,
                           ping_timeout=timeout, cors_allowed_origins="*")


@sio.event
async def connect(sid, environ, auth=None):
    stats["now"] += 1
    stats["total"] += 1


@sio.event
async def disconnect(sid):
    stats["now"] -= 1


async def plain(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\n"})


signal.signal(signal.SIGUSR1,
              lambda *_: print(json.dumps(stats), file=sys.stderr, flush=True))
app = socketio.ASGIApp(sio, other_asgi_app=plain, socketio_path="socket.io")
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
            lifespan="off", backlog=4096)
