"""An image store served over real HTTP on loopback (a uvicorn thread), for tests of what agents
do with it; errors leave in the server's JSON shape."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from corral.errors import CorralError
from corral.images import http as image_http
from corral.images.store import ImageStore


@contextlib.contextmanager
def served_store(root: Path, auth: Sequence[Any] = ()) -> Iterator[tuple[ImageStore, str]]:
    """A store at ``root`` and the base URL it is served at; closed after."""
    store = ImageStore(root)
    app = FastAPI()

    @app.exception_handler(CorralError)
    async def _err(_: Request, exc: CorralError) -> JSONResponse:  # as the server does
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)

    @app.get("/healthz")
    async def _healthz() -> dict[str, str]:  # as the server has: answered on the event loop
        return {"status": "ok"}

    app.include_router(image_http.router(store, list(auth)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield store, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()
