"""The systemd units corral ships (``corral-server.service``, ``corral-agent.service``).

They are package data, so a wheel carries them: ``corral systemd print UNIT`` writes one out, or
read them from this package's directory. Each runs ``/usr/local/bin/corral`` (a link to the
virtualenv's, see docs/operations.md); :func:`unit_text` puts another path in ``ExecStart=``.

There is no keeper unit: the agent starts the fence keeper and a restarted agent adopts it, and
``KillMode=process`` on the agent's unit keeps a stop or restart of the agent from taking the
keeper (and the runc and qemu shims, which live in the same cgroup) along with it.
"""

from __future__ import annotations

from importlib import resources

#: what ``ExecStart=`` runs in the shipped units
DEFAULT_BIN = "/usr/local/bin/corral"
UNITS = ("corral-server.service", "corral-agent.service")


def unit_name(name: str) -> str:
    """``corral-agent`` or ``corral-agent.service`` -> ``corral-agent.service``; KeyError when
    corral ships no such unit."""
    full = name if name.endswith(".service") else f"{name}.service"
    if full not in UNITS:
        raise KeyError(name)
    return full


def unit_text(name: str, corral_bin: str | None = None) -> str:
    """The unit's text, with ``corral_bin`` run instead of :data:`DEFAULT_BIN`."""
    text = resources.files(__name__).joinpath(unit_name(name)).read_text(encoding="utf-8")
    if corral_bin:
        text = "\n".join(f"ExecStart={corral_bin}{line[len('ExecStart=') + len(DEFAULT_BIN):]}"
                         if line.startswith(f"ExecStart={DEFAULT_BIN} ") else line
                         for line in text.split("\n"))
    return text
