"""The per-host agent: drivers, CPU/memory sampling, heartbeats and commands over NATS.

Entry point: :func:`corral.agent.daemon.serve` (``python -m corral.agent`` runs it standalone).
The agent never imports ``corral.control``; it talks to the server only over the bus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.config import Settings


def serve(settings: Settings) -> None:
    """Run the agent until SIGTERM/SIGINT (imported lazily: ``import corral.agent`` stays light)."""
    from corral.agent.daemon import serve as _serve

    _serve(settings)
