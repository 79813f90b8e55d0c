"""The agent's chunk cache without a server: what a sweep keeps, and the create/run contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.agent.imagecache import CHUNKS_FILE, STATS_FILE, ImageCache
from corral.api.models import CreateInstance
from corral.bus.messages import HeartbeatReply, JoinReply
from corral.errors import HostUnavailable


def record_chunks(instances: Path, name: str, image: str, ids: list[bytes]) -> None:
    d = instances / name
    d.mkdir(parents=True)
    (d / CHUNKS_FILE).write_text(json.dumps(
        {"image": image, "manifest_id": "x", "chunks": [i.hex() for i in ids]}))


def test_sweep_keeps_exactly_what_instances_record(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    instances.mkdir()
    cache = ImageCache(tmp_path, instances, "tok")
    try:
        ids = cache.packs.put_many([os.urandom(5000) for _ in range(6)])
        record_chunks(instances, "a", "img-a", ids[:3])
        record_chunks(instances, "b", "img-b", ids[2:4])
        cache.invalidated |= {"img-a", "img-gone"}
        res = cache.sweep()
        assert res["dropped"] == 2
        assert cache.packs.has_many(ids) == [True] * 4 + [False] * 2
        assert cache.invalidated == {"img-a"}  # still used by 'a'; 'img-gone' forgotten
        for i in ids[:4]:
            assert len(cache.packs.get(i)) == 5000  # kept chunks still read back
        stats = json.loads((tmp_path / STATS_FILE).read_text())
        assert stats["chunks"] == 4 and stats["sweeps"] == 1 and stats["dropped_chunks"] == 2
    finally:
        cache.close()
    again = ImageCache(tmp_path, instances, "tok")  # counters survive a restart
    try:
        assert again.stats()["dropped_chunks"] == 2 and again.stats()["chunks"] == 4
    finally:
        again.close()


def test_unreadable_chunk_list_keeps_everything(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    (instances / "a").mkdir(parents=True)
    (instances / "a" / CHUNKS_FILE).write_text("{not json")
    cache = ImageCache(tmp_path, instances, "tok")
    try:
        cache.packs.put_many([b"x" * 100])
        with pytest.raises(Exception, match="unreadable"):
            cache.sweep()
        assert len(cache.packs) == 1
    finally:
        cache.close()


def test_materialize_without_api_url_is_a_clear_retryable_error(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path, tmp_path / "instances", "tok")
    try:
        with pytest.raises(HostUnavailable, match="API address") as err:
            cache.materialize("img", tmp_path / "root", tmp_path / CHUNKS_FILE)
        assert err.value.retryable
    finally:
        cache.close()


def test_create_takes_an_image_or_a_rootfs_not_both() -> None:
    ok = CreateInstance(name="a", command=["true"], image="base")
    assert ok.image == "base" and ok.rootfs is None
    with pytest.raises(ValidationError, match="not both"):
        CreateInstance(name="a", command=["true"], image="base", rootfs="/srv/root")


def test_replies_default_to_no_api_url() -> None:
    """Servers that answer before their API listens (or older ones) send no URL."""
    assert JoinReply(lease_seconds=1, heartbeat_seconds=1, sample_seconds=1).api_url == ""
    assert HeartbeatReply(known=True).api_url == ""


def test_chunks_fetched_for_an_unshelve_show_in_the_figures_at_once(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    instances.mkdir()
    cache = ImageCache(tmp_path, instances, "tok")
    try:
        cache.packs.put_many([os.urandom(3000) for _ in range(3)])  # what a pull stored
        cache.count_fetched(3, 9000)
        stats = json.loads((tmp_path / STATS_FILE).read_text())
        assert stats["chunks"] == 3 and stats["fetched_chunks"] == 3
    finally:
        cache.close()
