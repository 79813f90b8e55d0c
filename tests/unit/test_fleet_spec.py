"""The fleet file (``corral apply``/``export``): parsing, the plan, the TOML writer, the schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.api.models import CheckSpec, InstanceView, RestartSpec, StandbyView
from corral.api.spec import FleetSpec, load, schema
from corral.cli.spec_plan import plan
from corral.cli.spec_toml import dumps, export, toml_value
from corral.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[2]

FILE = """
[[instance]]
name = "web"
cpus = 0.5
memory = "128M"
command = ["python3", "-m", "http.server"]
env = { MODE = "fast" }
tail = { access = "logs/access.log" }
standby = { host = "host2", every = "30s" }
restart = { mode = "on-failure", attempts = 5 }

[[instance]]
name = "db"
image = "postgres"
check = { target = "tcp::5432" }
"""


def view(name: str, **kw: Any) -> InstanceView:
    base: dict[str, Any] = {"name": name, "host": "host1", "driver": "process",
                            "command": ["sleep", "100"], "cpus": 0.1,
                            "memory_bytes": 64 * 1024**2, "desired_state": "running",
                            "state": "running", "created_at": 1.0, "updated_at": 1.0}
    base.update(kw)
    return InstanceView.model_validate(base)


def standby(name: str, host: str = "host2", every: float = 60.0) -> StandbyView:
    return StandbyView(instance=name, host=host, every_seconds=every, state="ready")


def spec(text: str) -> FleetSpec:
    return load(text, "fleet.toml")


# --- parsing -------------------------------------------------------------------------------


def test_a_file_is_read_into_requests() -> None:
    s = spec(FILE)
    web, db = s.instance
    req = web.request()
    assert req.memory_bytes == 128 * 1024**2 and req.cpus == 0.5
    assert req.env == {"MODE": "fast"} and req.tail == {"access": "logs/access.log"}
    assert web.standby is not None and web.standby.every == 30.0
    assert req.restart.mode == "on-failure" and req.restart.attempts == 5
    assert db.request().driver == "runc" and db.request().check is not None
    assert web.request().driver == "process"


@pytest.mark.parametrize(("text", "words"), [
    ('[[instance]]\nname = "a"\ncommand = ["x"]\ncpu = 1\n', ["line 4", "instance[0].cpu",
                                                              "unknown key"]),
    ('[[instance]]\nname = "A_b"\ncommand = ["x"]\n', ["line 2", "instance[0].name"]),
    ('[[instance]]\nname = "a"\ncommand = ["x"]\n\n[[instance]]\nname = "b"\ncommand = ["x"]\n'
     'memory = "12Q"\n', ["line 8", "instance[1].memory", "bad size"]),
    ('[[instance]]\nname = "a"\ncommand = ["x"]\nrestart = { mode = "always", atempts = 2 }\n',
     ["line 4", "restart.atempts", "unknown key"]),
    ('[[instance]]\nname = "a"\n', ["instance[0].command", "at least 1 word"]),
    ('[[instance]]\nname = "a"\ncommand = ["x"]\n[[instance]]\nname = "a"\ncommand = ["y"]\n',
     ["named twice"]),
    ('[[instance]]\nname = "a"\ncommand = ["x"]\nstandby = { every = "0.5s" }\n',
     ["line 4", "standby.every"]),
    ('[[instance]]\nname = "a"\ncommand = ["x"]\nvip = "10.0.0.300/24"\n', ["instance[0].vip"]),
    ('[[instance]\nname = "a"\n', ["not valid TOML", "line 1"]),
    ('[fleet]\nx = 1\n', ["fleet", "unknown key"]),
])
def test_problems_name_their_line_and_key(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        spec(text)
    message = info.value.message
    for word in words:
        assert word in message, message
    assert "corral apply --schema" in info.value.hint


def test_json_from_export_is_accepted() -> None:
    data = export([view("a")], [])
    assert spec(json.dumps(data)).instance[0].name == "a"


def test_published_schema_is_current() -> None:
    published = json.loads((ROOT / "docs" / "fleet.schema.json").read_text())
    assert published == schema(), "run: corral apply --schema > docs/fleet.schema.json"
    assert schema()["$defs"]["InstanceEntry"]["additionalProperties"] is False


# --- planning ------------------------------------------------------------------------------


def test_plan_creates_what_is_missing_and_leaves_the_rest_alone() -> None:
    p = plan(spec(FILE), [view("other")], [])
    assert [(c.action, c.name) for c in p.changes] == [
        ("create", "web"), ("create", "db"), ("standby-add", "web")]
    assert p.unmanaged == ["other"]


def test_plan_is_empty_when_the_fleet_matches() -> None:
    text = ('[[instance]]\nname = "a"\ncommand = ["sleep", "100"]\n'
            'standby = { every = 60 }\n')
    p = plan(spec(text), [view("a", host="host3")], [standby("a")])
    assert p.changes == [] and p.unmanaged == []


@pytest.mark.parametrize(("line", "field"), [
    ('command = ["sleep", "200"]', "command"),
    ('command = ["sleep", "100"]\ndriver = "runc"', "driver"),
    ('command = ["sleep", "100"]\nmemory = "65M"', "memory_bytes"),
    ('command = ["sleep", "100"]\ncpus = 2', "cpus"),
    ('command = ["sleep", "100"]\ntail = { app = "app.log" }', "tail"),
    ('command = ["sleep", "100"]\nrestart = { mode = "always" }', "restart"),
    ('command = ["sleep", "100"]\ncheck = { target = "tcp::80" }', "check"),
    ('command = ["sleep", "100"]\nvip = "10.0.0.5/24"', "vip"),
    ('entrypoint = ["sleep"]\ncommand = ["200"]', "command"),
])
def test_a_changed_field_is_a_recreate(line: str, field: str) -> None:
    p = plan(spec(f'[[instance]]\nname = "a"\n{line}\n'), [view("a")], [standby("a")])
    assert [c.action for c in p.changes] == ["recreate"]  # rm takes the standby with it
    assert [d[0] for d in p.changes[0].diffs] == [field]
    assert p.recreates == ["a"]


def test_recreate_adds_the_standby_again() -> None:
    text = '[[instance]]\nname = "a"\ncommand = ["x"]\nstandby = { host = "host2" }\n'
    p = plan(spec(text), [view("a")], [standby("a")])
    assert [c.action for c in p.changes] == ["recreate", "standby-add"]


def test_image_command_is_compared_only_when_it_does_not_need_the_image() -> None:
    v = view("a", driver="runc", image="web", command=["/entry", "serve"])
    assert plan(spec('[[instance]]\nname = "a"\nimage = "web"\n'), [v], []).changes == []
    text = '[[instance]]\nname = "a"\nimage = "web"\nentrypoint = []\ncommand = ["/entry"]\n'
    assert [c.action for c in plan(spec(text), [v], []).changes] == ["recreate"]


def test_host_pin_is_a_migrate_and_standby_changes_are_replaces() -> None:
    text = ('[[instance]]\nname = "a"\ncommand = ["sleep", "100"]\nhost = "host2"\n'
            'standby = { host = "host3", every = "2m" }\n')
    p = plan(spec(text), [view("a")], [standby("a", "host3", 60.0)])
    assert [c.action for c in p.changes] == ["migrate", "standby-replace"]
    assert p.changes[0].diffs == [("host", "host1", "host2")]
    d = p.as_dict()
    assert d["changes"][1]["changes"][0]["to"] == {"host": "host3", "every": 120.0}


# --- writer and export ---------------------------------------------------------------------


def test_export_plans_to_nothing() -> None:
    views = [
        view("a", tail={"app": "logs/app.log"}, vip="10.0.0.5/24",
             restart=RestartSpec(mode="always", delay=2.5),
             check=CheckSpec(target="http://:8080/health")),
        view("b", driver="runc", image="web", command=["/entry", "serve"], cpus=1.5,
             memory_bytes=1234567),
        view("c", driver="runc", rootfs="/srv/root", command=["/bin/sh"]),
    ]
    sbs = [standby("a", "host2", 45.0)]
    text = dumps(export(views, sbs))
    p = plan(spec(text), views, sbs)
    assert p.changes == [] and p.unmanaged == []


WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(WORDS, st.one_of(WORDS, st.integers(-2**63, 2**63 - 1),
                                        st.floats(allow_nan=False, allow_infinity=False),
                                        st.booleans(), st.lists(WORDS, max_size=3)),
                       max_size=4),
       st.lists(WORDS, max_size=4))
def test_writer_reads_back(env: dict[str, Any], words: list[str]) -> None:
    data = {"instance": [{"name": "a", "command": words, "env": env, "skipped": None}]}
    back = tomllib.loads(dumps(data, "# header\n"))
    assert back == {"instance": [{"name": "a", "command": words, "env": env}]}


def test_writer_refuses_what_toml_cannot_hold() -> None:
    with pytest.raises(ValueError):
        toml_value(float("nan"))
    with pytest.raises(TypeError):
        toml_value(object())
