"""Settings layers, parse errors that name field and value, and the docs covering every field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from corral import config
from corral.config import FIELDS, Settings, ensure_token, load
from corral.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    (tmp_path / "corral.toml").write_text('api_port = 1111\nlog_level = "debug"\n'
                                          "lease_seconds = 5\n")
    env = {"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_API_PORT": "2222", "OTHER": "x"}
    s = load({"lease_seconds": 7, "heartbeat_seconds": None}, env=env)
    assert s.data_dir == tmp_path
    assert s.api_port == 2222  # env beats file
    assert s.log_level == "debug"  # file beats default
    assert s.lease_seconds == 7.0  # flags beat file
    assert s.heartbeat_seconds == Settings().heartbeat_seconds  # None flags are unset


def test_explicit_config_file(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text('nats_url = "nats://a:1"\n')
    assert load(config_file=f, env={}).nats_url == "nats://a:1"


def test_bad_value_names_field_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"CORRAL_API_PORT": "eighty"})
    assert "'api_port'" in info.value.message and "'eighty'" in info.value.message
    assert "the environment" in info.value.message
    assert info.value.hint.startswith("api_port takes a int")


def test_non_positive_durations_are_refused() -> None:
    with pytest.raises(ConfigError, match="lease_seconds"):
        load({"lease_seconds": "0"}, env={})


def test_unknown_setting_lists_known_ones(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("colour = 1\n")
    with pytest.raises(ConfigError) as info:
        load(config_file=f, env={})
    assert "unknown setting 'colour'" in info.value.message
    assert "api_port" in info.value.hint


def test_broken_toml(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("api_port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(config_file=f, env={})


def test_dashes_are_underscores() -> None:
    assert config.from_mapping({"api-port": "9"}, "t") == {"api_port": 9}


def test_ensure_token_creates_a_private_file_once(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d")
    tok = ensure_token(s)
    path = tmp_path / "d" / "token"
    assert len(tok) >= 32 and path.read_text().strip() == tok
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_token(Settings(data_dir=tmp_path / "d")) == tok
    assert ensure_token(Settings(data_dir=tmp_path / "e", token="given")) == "given"
    assert not (tmp_path / "e" / "token").exists()


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"^### `([a-z_]+)`", text, flags=re.M))
    assert documented == set(FIELDS), (
        f"missing from docs/configuration.md: {sorted(set(FIELDS) - documented)}; "
        f"documented but not settings: {sorted(documented - set(FIELDS))}")
    for name in FIELDS:
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert f"CORRAL_{name.upper()}" in section, f"{name}: no environment variable shown"
        assert "Default:" in section, f"{name}: no default shown"


def test_the_offload_delay_takes_the_values_its_docs_define() -> None:
    """0 means at once and -1 never (docs/configuration.md); other negatives are refused."""
    from corral.config import from_mapping

    assert from_mapping({"shelved_offload_seconds": 0}, "test") == {"shelved_offload_seconds": 0}
    assert from_mapping({"shelved_offload_seconds": "-1"}, "t")["shelved_offload_seconds"] == -1
    with pytest.raises(ConfigError, match="or -1"):
        from_mapping({"shelved_offload_seconds": -5}, "test")
    with pytest.raises(ConfigError, match="must be positive"):
        from_mapping({"lease_seconds": 0}, "test")
    # the heartbeat budget: 0 is no limit, a negative one is refused
    assert from_mapping({"max_heartbeats_per_second": "0"}, "t") == {
        "max_heartbeats_per_second": 0.0}
    with pytest.raises(ConfigError, match="no limit"):
        from_mapping({"max_heartbeats_per_second": -5}, "test")


def test_an_empty_token_file_refuses_to_start(tmp_path: Path) -> None:
    """An empty token file must never mean "no auth"."""
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ensure_token(Settings(data_dir=tmp_path))
