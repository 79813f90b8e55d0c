"""``python -m corral.agent``: run one agent standalone (what ``corral agent`` and tests use).

Flags override ``CORRAL_*`` environment variables, which override ``DATA/corral.toml``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from corral import config
from corral.agent.daemon import serve
from corral.errors import CorralError


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="corral-agent", description="run a corral agent")
    p.add_argument("--nats", dest="nats_url", help="bus URL, e.g. nats://127.0.0.1:4222")
    p.add_argument("--token", help="fleet token")
    p.add_argument("--data-dir", dest="data_dir", type=Path, help="this host's data directory")
    p.add_argument("--host-name", dest="host_name", help="this host's name")
    p.add_argument("--host-address", dest="host_address", help="address others reach us at")
    p.add_argument("--drivers", help="comma-separated drivers to offer")
    p.add_argument("--stop-timeout", dest="stop_timeout", type=float)
    p.add_argument("--config", type=Path, help="TOML file (default DATA/corral.toml)")
    p.add_argument("--log-level", dest="log_level")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = vars(parse(argv))
    config_file = ns.pop("config")
    try:
        settings = config.load(ns, config_file=config_file)
    except CorralError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level.lower() != "debug":  # one line per chunk request is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        serve(settings)
    except CorralError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
