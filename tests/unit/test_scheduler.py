"""Placement rules, as plain values in and a host name (or a reasoned refusal) out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import NoCapacity
from corral.scheduling.placement import HostSnapshot, Request, candidates, fits, place

GiB = 1024**3
MiB = 1024**2
DRIVERS = frozenset({"process", "runc"})


def host(name: str, *, up: bool = True, cores: int = 2, mem: int = 4 * GiB, rc: float = 0.0,
         rm: int = 0, drivers: frozenset[str] = DRIVERS) -> HostSnapshot:
    return HostSnapshot(name, up, cores, mem, rc, rm, drivers)


def test_spreads_to_the_host_with_most_free_cpu_share() -> None:
    hosts = [host("h1", rc=1.5), host("h2", rc=0.5), host("h3", rc=1.0)]
    assert place(Request(0.5, 64 * MiB, "process"), hosts) == "h2"


def test_share_not_absolute_free_cpus_decides() -> None:
    # h1 has 3 free cores of 8 (37%), h2 1.5 of 2 (75%): the emptier host wins.
    hosts = [host("h1", cores=8, rc=5.0), host("h2", cores=2, rc=0.5)]
    assert place(Request(1.0, MiB, "process"), hosts) == "h2"


def test_ties_broken_by_memory_share_then_name() -> None:
    assert place(Request(0.1, MiB, "process"), [host("b"), host("a")]) == "a"
    hosts = [host("a", rm=2 * GiB), host("b", rm=1 * GiB)]
    assert place(Request(0.1, MiB, "process"), hosts) == "b"


def test_skips_down_hosts_and_missing_drivers() -> None:
    hosts = [host("h1", up=False), host("h2", drivers=frozenset({"process"})), host("h3", rc=1.9)]
    assert place(Request(0.1, MiB, "runc"), hosts) == "h3"


def test_exact_fit_is_accepted_despite_float_rounding() -> None:
    h = host("h1", cores=1, rc=0.1 + 0.2, mem=GiB, rm=GiB - MiB)
    assert fits(Request(0.7, MiB, "process"), h)
    assert not fits(Request(0.71, MiB, "process"), h)
    assert not fits(Request(0.7, MiB + 1, "process"), h)


def test_shortfall_names_every_host() -> None:
    hosts = [
        host("h1", rc=1.5),
        host("h2", up=False),
        host("h3", drivers=frozenset({"process"})),
        host("h4", mem=GiB, rm=GiB - 10 * MiB, rc=0.0),
    ]
    with pytest.raises(NoCapacity) as info:
        place(Request(1.0, 512 * MiB, "runc"), hosts)
    err = info.value
    short = err.details["shortfall"]
    assert short["h1"] == "needs 1 cpus, 0.5 free"
    assert short["h2"] == "down"
    assert short["h3"] == "no runc driver"
    assert short["h4"] == "needs 512 MiB memory, 10 MiB free"
    assert "h1: needs 1 cpus, 0.5 free; h2: down; h3: no runc driver" in err.message
    assert err.retryable and err.http_status == 409


def test_shortfall_lists_cpu_and_memory_together() -> None:
    with pytest.raises(NoCapacity) as info:
        place(Request(3.0, 8 * GiB, "process"), [host("h1")])
    assert info.value.details["shortfall"]["h1"] == (
        "needs 3 cpus, 2 free, needs 8.00 GiB memory, 4.00 GiB free")


def test_overcommitted_host_reports_zero_free_not_negative() -> None:
    with pytest.raises(NoCapacity) as info:
        place(Request(1.0, MiB, "process"), [host("h1", rc=2.5)])
    assert info.value.details["shortfall"]["h1"] == "needs 1 cpus, 0 free"


def test_pinned_host_is_used_even_when_another_is_emptier() -> None:
    hosts = [host("h1", rc=1.0), host("h2")]
    assert place(Request(0.5, MiB, "process", host="h1"), hosts) == "h1"


def test_pinned_host_that_cannot_fit_reports_only_itself() -> None:
    hosts = [host("h1", rc=2.0), host("h2")]
    with pytest.raises(NoCapacity) as info:
        place(Request(0.5, MiB, "process", host="h1"), hosts)
    assert info.value.details["shortfall"] == {"h1": "needs 0.5 cpus, 0 free"}


def test_pinned_unknown_host() -> None:
    with pytest.raises(NoCapacity) as info:
        place(Request(0.5, MiB, "process", host="nope"), [host("h1")])
    assert info.value.details["shortfall"] == {"nope": "no such host"}


def test_empty_fleet_says_to_start_an_agent() -> None:
    with pytest.raises(NoCapacity) as info:
        place(Request(0.5, MiB, "process"), [])
    assert "no host has joined" in info.value.message
    assert "agent" in info.value.hint


def test_avoid_excludes_hosts() -> None:
    hosts = [host("h1"), host("h2", rc=1.0)]
    assert place(Request(0.5, MiB, "process", avoid=frozenset({"h1"})), hosts) == "h2"
    with pytest.raises(NoCapacity) as info:
        place(Request(0.5, MiB, "process", avoid=frozenset({"h1", "h2"})), hosts)
    assert info.value.details["shortfall"]["h1"] == "excluded (anti-affinity)"


def test_candidates_are_ordered_best_first() -> None:
    hosts = [host("h1", rc=1.0), host("h2", rc=0.0), host("h3", rc=1.9), host("h4", up=False)]
    assert [h.name for h in candidates(Request(0.05, MiB, "process"), hosts)] == ["h2", "h1", "h3"]


hosts_strategy = st.lists(
    st.builds(
        HostSnapshot,
        name=st.text("abcdefgh", min_size=1, max_size=4),
        up=st.booleans(),
        cores=st.integers(1, 64),
        memory_bytes=st.integers(0, 64 * GiB),
        reserved_cpus=st.floats(0, 80, allow_nan=False),
        reserved_memory=st.integers(0, 80 * GiB),
        drivers=st.frozensets(st.sampled_from(["process", "runc", "qemu"])),
    ),
    max_size=8,
    unique_by=lambda h: h.name,
)
requests = st.builds(
    Request,
    cpus=st.floats(0.01, 70, allow_nan=False),
    memory_bytes=st.integers(1, 70 * GiB),
    driver=st.sampled_from(["process", "runc"]),
)


@given(requests, hosts_strategy)
def test_a_placed_request_always_fits(req: Request, hosts: list[HostSnapshot]) -> None:
    try:
        chosen = place(req, hosts)
    except NoCapacity as exc:
        # refused only when truly nothing fits, and every host is accounted for
        assert not any(fits(req, h) for h in hosts)
        assert set(exc.details["shortfall"]) == {h.name for h in hosts}
        return
    h = next(h for h in hosts if h.name == chosen)
    assert h.up and req.driver in h.drivers
    assert h.reserved_cpus + req.cpus <= h.cores + 1e-6
    assert h.reserved_memory + req.memory_bytes <= h.memory_bytes
    # spread: no other fitting host has a strictly larger free CPU share
    assert all(o.free_cpu_share <= h.free_cpu_share for o in hosts if fits(req, o))


# --- preference (unshelve: hosts that already cache more of the disk's chunks) ---------------


def test_preference_beats_spreading_among_hosts_that_fit() -> None:
    hosts = [host("h1", rc=0.0), host("h2", rc=1.5), host("h3", rc=1.0)]
    req = Request(0.1, MiB, "process", prefer={"h2": 0.9, "h3": 0.4})
    assert place(req, hosts) == "h2"
    assert [h.name for h in candidates(req, hosts)] == ["h2", "h3", "h1"]


def test_preference_never_picks_a_host_that_does_not_fit() -> None:
    hosts = [host("h1", rc=0.0), host("h2", rc=1.95), host("h3", up=False)]
    req = Request(0.5, MiB, "process", prefer={"h2": 1.0, "h3": 1.0})
    assert place(req, hosts) == "h1"
    with pytest.raises(NoCapacity):
        place(Request(0.5, MiB, "process", host="h2", prefer={"h2": 1.0}), hosts)


def test_preference_is_compared_in_steps_so_noise_does_not_beat_spreading() -> None:
    hosts = [host("h1", rc=1.0), host("h2", rc=0.0)]
    assert place(Request(0.1, MiB, "process", prefer={"h1": 0.52, "h2": 0.49}), hosts) == "h2"
    assert place(Request(0.1, MiB, "process", prefer={"h1": 0.62, "h2": 0.49}), hosts) == "h1"
    assert place(Request(0.1, MiB, "process", prefer={}), hosts) == "h2"


@given(scores=st.dictionaries(st.sampled_from(["h1", "h2", "h3"]),
                              st.floats(min_value=0.0, max_value=1.0), max_size=3),
       reserved=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=3, max_size=3))
def test_preferred_choice_fits_and_has_the_best_score(scores: dict[str, float],
                                                      reserved: list[float]) -> None:
    hosts = [host(f"h{i + 1}", rc=r) for i, r in enumerate(reserved)]
    req = Request(0.1, MiB, "process", prefer=scores)
    ok = [h for h in hosts if fits(req, h)]
    if not ok:
        return
    chosen = place(req, hosts)
    assert fits(req, next(h for h in hosts if h.name == chosen))
    assert req.preference(chosen) == max(req.preference(h.name) for h in ok)


def draining(name: str, **kw: object) -> HostSnapshot:
    from dataclasses import replace

    return replace(host(name, **kw), draining=True)  # type: ignore[arg-type]


def test_a_draining_host_takes_nothing_new() -> None:
    hosts = [draining("h1"), host("h2", rc=1.5)]  # h1 is empty, h2 nearly full: still h2
    assert place(Request(0.5, MiB, "process"), hosts) == "h2"
    assert [h.name for h in candidates(Request(0.1, MiB, "process"), hosts)] == ["h2"]
    assert not fits(Request(0.1, MiB, "process"), draining("h1"))


def test_a_draining_host_refuses_a_pinned_request_and_says_why() -> None:
    with pytest.raises(NoCapacity) as exc:
        place(Request(0.5, MiB, "process", host="h1"), [draining("h1"), host("h2")])
    assert exc.value.details["shortfall"] == {"h1": "draining"}


def test_only_draining_hosts_left_is_no_capacity_naming_them() -> None:
    with pytest.raises(NoCapacity) as exc:
        place(Request(0.5, MiB, "process"), [draining("h1"), draining("h2")])
    assert exc.value.details["shortfall"] == {"h1": "draining", "h2": "draining"}
    assert "h1: draining" in exc.value.message


def test_a_preference_never_outweighs_the_drain_mark() -> None:
    req = Request(0.5, MiB, "process", prefer={"h1": 1.0})
    assert place(req, [draining("h1"), host("h2")]) == "h2"
