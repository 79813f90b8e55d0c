"""CPU accounting: exact figures on made-up sequences, never a spike or a negative on any."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.telemetry.accounting import CpuAccountant

S = 1_000_000_000  # one second in ns


def test_first_sample_has_no_figure() -> None:
    acc = CpuAccountant(host_cores=4)
    assert acc.update("a", 5 * S, "g1", 100 * S) == (None, None)


def test_one_core_busy_on_four_core_host() -> None:
    acc = CpuAccountant(host_cores=4)
    acc.update("a", 0, "g1", 10 * S)
    core, host = acc.update("a", 2 * S, "g1", 12 * S)
    assert core == pytest.approx(100.0)
    assert host == pytest.approx(25.0)


def test_half_core_then_idle() -> None:
    acc = CpuAccountant(host_cores=2)
    acc.update("a", 0, "g1", 0)
    assert acc.update("a", S // 2, "g1", S) == pytest.approx((50.0, 25.0))
    assert acc.update("a", S // 2, "g1", 2 * S) == (0.0, 0.0)


def test_new_generation_rebaselines_instead_of_spiking() -> None:
    acc = CpuAccountant(host_cores=2)
    acc.update("a", 50 * S, "g1", 100 * S)
    # restarted: counter is small again but in a new generation
    assert acc.update("a", S, "g2", 101 * S) == (None, None)
    core, host = acc.update("a", S + S // 4, "g2", 102 * S)
    assert core == pytest.approx(25.0)
    assert host == pytest.approx(12.5)


def test_new_generation_with_bigger_counter_is_not_a_spike() -> None:
    acc = CpuAccountant(host_cores=2)
    acc.update("a", 0, "g1", 0)
    assert acc.update("a", 900 * S, "g2", S) == (None, None)


def test_counter_going_backwards_rebaselines() -> None:
    acc = CpuAccountant(host_cores=1)
    acc.update("a", 10 * S, "g1", 10 * S)
    assert acc.update("a", 3 * S, "g1", 11 * S) == (None, None)
    assert acc.update("a", 3 * S + S // 10, "g1", 12 * S) == pytest.approx((10.0, 10.0))


@pytest.mark.parametrize("wall", [10 * S, 9 * S])
def test_wall_clock_not_advancing_rebaselines(wall: int) -> None:
    acc = CpuAccountant(host_cores=1)
    acc.update("a", 0, "g1", 10 * S)
    assert acc.update("a", S, "g1", wall) == (None, None)


def test_forget_starts_a_new_baseline() -> None:
    acc = CpuAccountant(host_cores=1)
    acc.update("a", 0, "g1", 0)
    acc.forget("a")
    assert "a" not in acc.known()
    assert acc.update("a", S, "g1", S) == (None, None)
    acc.forget("never-seen")  # no error


def test_forget_missing_keeps_present() -> None:
    acc = CpuAccountant(host_cores=1)
    for n in ("a", "b", "c"):
        acc.update(n, 0, "g", 0)
    acc.forget_missing(["b"])
    assert acc.known() == {"b"}


def test_instances_are_independent() -> None:
    acc = CpuAccountant(host_cores=2)
    acc.update("a", 0, "g", 0)
    acc.update("b", 0, "g", 0)
    assert acc.update("a", S, "g", S)[0] == pytest.approx(100.0)
    assert acc.update("b", S // 10, "g", S)[0] == pytest.approx(10.0)


def test_jitter_above_host_capacity_is_clamped() -> None:
    acc = CpuAccountant(host_cores=2)
    acc.update("a", 0, "g", 0)
    core, host = acc.update("a", 3 * S, "g", S)
    assert core == pytest.approx(200.0)
    assert host == pytest.approx(100.0)


def test_host_totals_sum_and_rest() -> None:
    acc = CpuAccountant(host_cores=4)
    totals = acc.host_totals([100.0, 50.0, None])
    assert totals.core_pct == pytest.approx(150.0)
    assert totals.host_pct == pytest.approx(37.5)
    assert totals.free_host_pct == pytest.approx(62.5)
    assert acc.host_totals([400.0, 400.0]).free_host_pct == 0.0


def test_bad_core_count_refused() -> None:
    with pytest.raises(ValueError, match="host_cores"):
        CpuAccountant(host_cores=0)


# One step of a random counter history: advance the clock and counter, or restart, or reset.
_step = st.tuples(
    st.sampled_from(["advance", "advance", "advance", "restart", "reset", "stall"]),
    st.integers(min_value=-S, max_value=5 * S),  # wall delta (may go backwards)
    st.integers(min_value=0, max_value=10 * S),  # cpu delta or new counter value
)


@settings(max_examples=300, deadline=None)
@given(
    cores=st.integers(min_value=1, max_value=64),
    steps=st.lists(_step, min_size=1, max_size=60),
)
def test_random_histories_never_negative_nor_above_host(
    cores: int, steps: list[tuple[str, int, int]]
) -> None:
    acc = CpuAccountant(host_cores=cores)
    cpu, wall, gen = 0, 0, 0
    for kind, dwall, dcpu in steps:
        if kind == "advance":
            cpu += dcpu
            wall += dwall
        elif kind == "restart":
            gen += 1
            cpu = dcpu
            wall += abs(dwall)
        elif kind == "reset":  # same generation, counter dropped
            cpu = max(0, cpu - dcpu)
            wall += abs(dwall)
        else:  # stall: clock does not move
            cpu += dcpu
        core, host = acc.update("x", cpu, f"g{gen}", wall)
        assert (core is None) == (host is None)
        if core is not None and host is not None:
            assert 0.0 <= core <= cores * 100.0 + 1e-6
            assert 0.0 <= host <= 100.0 + 1e-6
            assert host == pytest.approx(core / cores)


@settings(max_examples=200, deadline=None)
@given(
    cores=st.integers(min_value=1, max_value=16),
    rates=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=2, max_size=30),
    dwall=st.integers(min_value=1000, max_value=10 * S),
)
def test_steady_rates_are_reproduced(cores: int, rates: list[float], dwall: int) -> None:
    """A workload using fraction r of each core for a tick reads back as r*100 per core."""
    acc = CpuAccountant(host_cores=cores)
    cpu, wall = 0, 0
    acc.update("x", cpu, "g", wall)
    for r in rates:
        used = int(r * cores * dwall)
        cpu += used
        wall += dwall
        core, host = acc.update("x", cpu, "g", wall)
        assert core == pytest.approx(100.0 * used / dwall)
        assert host == pytest.approx(100.0 * used / dwall / cores)


def test_host_cpu_from_proc_stat() -> None:
    from corral.telemetry.accounting import HostCpu, parse_proc_stat

    assert parse_proc_stat("cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 ...") == (15, 100)
    hc = HostCpu()
    assert hc.update("cpu  10 0 5 80 5 0 0 0 0 0") is None  # first reading: no figure
    assert hc.update("cpu  40 0 15 120 5 0 0 0 0 0") == pytest.approx(100 * 40 / 80)
    assert hc.update("cpu  1 0 0 1 0 0 0 0 0 0") is None  # counters went back: no figure
    real = HostCpu()
    real.update()
    pct = real.update()
    assert pct is None or 0.0 <= pct <= 100.0
