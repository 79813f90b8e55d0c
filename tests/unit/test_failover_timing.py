"""Lease timings (issue 11): the rules that keep fencing ahead of the server's deadline, the
``failover = "fast"`` preset, and the errors that say what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.agent import keeper
from corral.agent.fence import LeaseClock
from corral.config import (
    KEEPER_POLL_SECONDS,
    MIN_FENCE_MARGIN,
    PROFILES,
    Settings,
    check_timing,
    load,
    timing_problems,
)
from corral.errors import ConfigError

FAST = {"lease_seconds": "2", "heartbeat_seconds": "0.5", "fence_margin_seconds": "0.5",
        "failover_grace_seconds": "0.5"}


def test_the_defaults_and_the_fast_profile_are_accepted() -> None:
    assert timing_problems(Settings()) == []
    s = load(FAST, env={})
    assert (s.lease_seconds, s.heartbeat_seconds, s.fence_margin_seconds) == (2.0, 0.5, 0.5)


def test_the_fast_preset_sets_the_four_timings() -> None:
    s = load({"failover": "fast"}, env={})
    assert {k: getattr(s, k) for k in PROFILES["fast"]} == PROFILES["fast"]
    assert s.failover == "fast"
    assert load({"failover": "default"}, env={}).lease_seconds == Settings().lease_seconds


def test_a_setting_of_its_own_beats_the_preset(tmp_path: Path) -> None:
    (tmp_path / "corral.toml").write_text('failover = "fast"\nlease_seconds = 3\n')
    s = load({"heartbeat_seconds": "0.4"}, env={"CORRAL_DATA_DIR": str(tmp_path)})
    assert (s.lease_seconds, s.heartbeat_seconds, s.fence_margin_seconds) == (3.0, 0.4, 0.5)


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="'failover'") as info:
        load({"failover": "faster"}, env={})
    assert "'fast'" in info.value.hint


def test_a_short_lease_without_a_short_margin_is_refused_with_what_to_do() -> None:
    """The trap: lease 2 s with the default 2 s margin leaves no fence window at all."""
    with pytest.raises(ConfigError, match="fence window") as info:
        load({"lease_seconds": "2", "heartbeat_seconds": "0.5"}, env={})
    assert "fence_margin_seconds to at most 1" in info.value.hint
    assert "failover=fast" in info.value.hint


def test_a_heartbeat_over_a_third_of_the_lease_is_refused() -> None:
    with pytest.raises(ConfigError, match="more than a third") as info:
        load({**FAST, "heartbeat_seconds": "0.7"}, env={})
    assert "heartbeat_seconds to at most 0.667" in info.value.hint


def test_a_margin_under_the_keepers_poll_and_kill_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fence_margin_seconds 0\.1 is under") as info:
        load({**FAST, "fence_margin_seconds": "0.1"}, env={})
    assert f"at least {MIN_FENCE_MARGIN:g}" in info.value.hint
    assert "failover=fast" in info.value.hint


def test_a_fence_window_under_two_heartbeats_is_refused() -> None:
    # 3 heartbeats per lease holds (0.6 <= 1.8), but 1.8 - 0.7 = 1.1 < 2 x 0.6
    with pytest.raises(ConfigError, match="shorter than 2 heartbeats"):
        check_timing(Settings(lease_seconds=1.8, heartbeat_seconds=0.6,
                              fence_margin_seconds=0.7))


def test_a_fence_window_under_a_second_is_refused() -> None:
    with pytest.raises(ConfigError, match="under 1 s"):
        check_timing(Settings(lease_seconds=1.2, heartbeat_seconds=0.2,
                              fence_margin_seconds=0.3))


@pytest.mark.parametrize("lease,hb,margin", [
    (10, 2, 2), (2, 0.5, 0.5), (3, 1, 1), (1.5, 0.25, 0.5), (30, 1, 5), (7, 2, 2)])
def test_sound_combinations_pass(lease: float, hb: float, margin: float) -> None:
    assert timing_problems(Settings(lease_seconds=lease, heartbeat_seconds=hb,
                                    fence_margin_seconds=margin)) == []


@pytest.mark.parametrize("lease,hb,margin", [
    (2, 0.5, 2), (2, 1, 0.5), (2, 0.5, 0.2), (1, 0.25, 0.25), (10, 4, 2), (10, 2, 9)])
def test_unsound_combinations_fail(lease: float, hb: float, margin: float) -> None:
    assert timing_problems(Settings(lease_seconds=lease, heartbeat_seconds=hb,
                                    fence_margin_seconds=margin))


def test_the_rules_match_the_agent_and_keeper() -> None:
    """The margin rule is built on the keeper's poll; an accepted combination never hits the
    agent's fallback (a window under fence.MIN_WINDOW fences at half the lease instead)."""
    assert KEEPER_POLL_SECONDS == keeper.POLL_SECONDS
    s = load(FAST, env={})
    clock = LeaseClock(s.lease_seconds, s.fence_margin_seconds, clock=lambda: 100.0)
    assert clock.window == s.lease_seconds - s.fence_margin_seconds == 1.5
    # fenced at least the margin before the server's deadline (counted from the same send)
    assert clock.deadline <= 100.0 + s.lease_seconds - MIN_FENCE_MARGIN
