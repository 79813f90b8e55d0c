"""The image routes do their CPU work (decompressing, hashing, zstd, big LMDB batches) in worker
threads: while a big upload or a manifest is being processed, the server's event loop still
answers everything else (the API's heartbeats and ``/healthz`` run on that loop).

Each test holds the store's work at a gate the test opens itself, asks ``/healthz`` meanwhile
and asserts that it answered; nothing is timed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from storeserver import served_store

from corral.images.packstore import PackStore
from corral.images.records import MAX_UPLOAD_BYTES, encode_records
from corral.images.store import ImageStore
from corral.images.tree import snapshot


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, str]]:
    with served_store(tmp_path / "server-store") as pair:
        yield pair


class Gate:
    """Wraps a callable so that a call waits, inside it, until the test opens the gate."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        return self.fn(*args, **kwargs)


def request_in_thread(method: str, url: str, **kw: Any) -> tuple[threading.Thread,
                                                                 list[httpx.Response]]:
    out: list[httpx.Response] = []

    def run() -> None:
        with httpx.Client(timeout=120) as c:
            out.append(c.request(method, url, **kw))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def healthz_answers(url: str) -> bool:
    """One health probe; a loop stalled behind the upload never answers it."""
    try:
        with httpx.Client(timeout=15) as c:
            return c.get(f"{url}/healthz").status_code == 200
    except httpx.TimeoutException:
        return False


def test_healthz_answers_while_a_big_upload_is_processed(served: tuple[ImageStore, str],
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    store, url = served
    root = tmp_path / "big"
    root.mkdir()
    (root / "blob").write_bytes(os.urandom(MAX_UPLOAD_BYTES - 512 * 1024))  # one full batch
    with PackStore(tmp_path / "cache") as cache:
        m = snapshot(root, cache)
        records = []
        for cid in sorted(bytes.fromhex(c) for c in m.chunk_ids()):
            got = cache.read_compressed(cid)
            assert got is not None
            records.append((cid, got[0], got[1]))
    assert len(records) > 50
    gate = Gate(store.packs.put_compressed)
    monkeypatch.setattr(store.packs, "put_compressed", gate)
    t, out = request_in_thread("POST", f"{url}/v1/chunks/upload",
                               content=encode_records(records))
    try:
        assert gate.entered.wait(60), "the upload never reached the store"
        assert healthz_answers(url)
    finally:
        gate.open.set()
        t.join(120)
    assert out and out[0].status_code == 200, out
    assert out[0].json() == {"stored": len(records)}
    assert all(store.packs.has_many([r[0] for r in records]))


def test_healthz_answers_while_a_manifest_is_named(served: tuple[ImageStore, str],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store, url = served
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(200):
        (root / f"f{i}").write_text(str(i))
    with PackStore(tmp_path / "cache") as cache:
        m = snapshot(root, cache)
    store.packs.put_many([str(i).encode() for i in range(200)])
    gate = Gate(store.put_manifest)
    monkeypatch.setattr(store, "put_manifest", gate)
    t, out = request_in_thread("PUT", f"{url}/v1/images/many", content=m.to_json())
    try:
        assert gate.entered.wait(60), "the manifest never reached the store"
        assert healthz_answers(url)
    finally:
        gate.open.set()
        t.join(120)
    assert out and out[0].status_code == 200, out[0].text
    assert store.names() == ["many"]


def test_an_upload_over_the_bound_is_refused(served: tuple[ImageStore, str]) -> None:
    _, url = served
    big = b"\0" * (MAX_UPLOAD_BYTES + 1)
    with httpx.Client(timeout=120) as c:
        resp = c.post(f"{url}/v1/chunks/upload", content=big)
    assert resp.status_code == 422, resp.text
    assert "bytes" in resp.json()["error"]["message"]


def test_a_record_claiming_a_huge_chunk_is_refused(served: tuple[ImageStore, str]) -> None:
    """``raw_len`` bounds the decompression: a record claiming 1 GiB is refused unread."""
    _, url = served
    body = encode_records([(b"\1" * 32, 1024**3, b"x" * 100)])
    with httpx.Client(timeout=60) as c:
        resp = c.post(f"{url}/v1/chunks/upload", content=body)
    assert resp.status_code == 422, resp.text
