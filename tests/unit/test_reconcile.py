"""Reconciliation: at most one live copy survives, the newest epoch wins, silence is respected."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from corral.ha.reconcile import Record, Seen, reconcile


def test_partition_healed_old_copy_is_stopped() -> None:
    # h1 was cut off, failover promoted web on h2 with epoch 5; h1 comes back still running 4
    plan = reconcile([Record("web", "h2", 5)],
                     [Seen("h1", "web", 4, "running"), Seen("h2", "web", 5, "running")],
                     {"h1", "h2"})
    assert [(s.host, s.epoch) for s in plan.stops] == [("h1", 4)]
    assert plan.relocations == []


def test_server_lost_its_write_record_follows_the_newest_copy() -> None:
    # the server crashed after the agent started epoch 7 on h3 but before recording it
    plan = reconcile([Record("db", "h1", 6)],
                     [Seen("h1", "db", 6, "stopped"), Seen("h3", "db", 7, "running")],
                     {"h1", "h3"})
    assert plan.stops == []
    assert [(m.host, m.epoch) for m in plan.relocations] == [("h3", 7)]


def test_silent_host_with_newer_epoch_fences_the_rest() -> None:
    plan = reconcile([Record("web", "h2", 9)], [Seen("h1", "web", 8, "running")], {"h1"})
    assert [(s.host, s.epoch) for s in plan.stops] == [("h1", 8)]
    plan = reconcile([Record("web", "h2", 9)], [], {"h1"})
    assert plan.unknown == ["web"] and plan.stops == []


def test_deleted_instance_running_somewhere_is_stopped() -> None:
    plan = reconcile([], [Seen("h1", "ghost", 2, "running")], {"h1"})
    assert [s.instance for s in plan.stops] == ["ghost"]


def test_same_epoch_twice_keeps_the_recorded_host() -> None:
    plan = reconcile([Record("web", "h1", 3)],
                     [Seen("h2", "web", 3, "running"), Seen("h1", "web", 3, "running")],
                     {"h1", "h2"})
    assert [(s.host, s.epoch) for s in plan.stops] == [("h2", 3)]


hosts = st.sampled_from(["h1", "h2", "h3"])
states = st.sampled_from(["running", "frozen", "stopped", "exited"])


@given(
    st.lists(st.tuples(hosts, st.integers(0, 5), states), max_size=6),
    st.one_of(st.none(), st.tuples(hosts, st.integers(0, 6))),
    st.sets(hosts),
)
def test_at_most_one_live_copy_and_it_is_the_newest(
    copies: list[tuple[str, int, str]], rec: tuple[str, int] | None, answered: set[str]
) -> None:
    # a host reports each instance once; only answering hosts report
    seen_by_host = {h: Seen(h, "web", e, s) for h, e, s in copies if h in answered}
    seen = list(seen_by_host.values())
    records = [Record("web", rec[0], rec[1])] if rec else []
    plan = reconcile(records, seen, answered)
    stopped = {(s.host, s.epoch) for s in plan.stops}
    survivors = [c for c in seen if c.state in ("running", "frozen")
                 and (c.host, c.epoch) not in stopped]
    assert len(survivors) <= 1
    if survivors:
        live_epochs = [c.epoch for c in seen if c.state in ("running", "frozen")]
        assert survivors[0].epoch == max(live_epochs)
        if rec:
            assert survivors[0].epoch >= rec[1]
    else:
        assert all(c.host in {s.host for s in plan.stops} or c.state not in ("running", "frozen")
                   for c in seen)
