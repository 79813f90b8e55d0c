"""``corral traffic NAME``: an instance's live traffic from its access log, refreshed every
second."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from corral.api.timespec import iso
from corral.cli import render
from corral.cli.app import client

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from corral.api.models import TrafficView


def _rate(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def frame(v: TrafficView) -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"{v.instance}  {time.strftime('%H:%M:%S', time.localtime(v.at))}  "
                f"online {v.online} (last {v.online_window_s / 60:g} min)  lines {v.lines}  "
                f"requests {v.hits}  bad lines {v.bad_lines}")
    rates = Table(box=None, header_style="bold", pad_edge=False)
    rates.add_column("WINDOW")
    for col in ("HITS/S", "2xx/s", "3xx/s", "4xx/s", "5xx/s", "CODES/S"):
        rates.add_column(col, justify="right" if col != "CODES/S" else "left")
    for w in v.windows:
        codes = "  ".join(f"{c}:{_rate(r)}" for c, r in w.status_per_s.items())
        rates.add_row(f"{w.seconds}s", _rate(w.hits_per_s),
                      *(_rate(w.class_per_s.get(c, 0.0)) for c in ("2xx", "3xx", "4xx", "5xx")),
                      codes or "-")
    parts: list[Text | Table] = [head, Text(""), rates, Text("")]
    if v.url is not None:
        clients = Table(box=None, header_style="bold", pad_edge=False,
                        title=f"{v.url}: {v.url_online} online, latest first", title_justify="left")
        clients.add_column("CLIENT")
        clients.add_column("LAST SEEN")
        for cl in v.clients:
            clients.add_row(cl.client, iso(cl.last_seen))
        parts.append(clients)
    else:
        urls = Table(box=None, header_style="bold", pad_edge=False)
        urls.add_column("URL")
        urls.add_column("ONLINE", justify="right")
        for u in v.top_urls:
            urls.add_row(u.url, str(u.online))
        parts.append(urls)
    return Group(*parts)


def traffic(name: str, url: str | None, limit: int, interval: float, once: bool,
            json_out: bool) -> None:
    """``--json`` prints the view as the server sent it; frames are drawn from its model."""
    with client(timeout=10) as c:
        raw = c.traffic_data(name, url, limit)
        if json_out:
            render.print_json(raw)
            return
        from corral.api.models import TrafficView

        view = TrafficView.model_validate(raw)
        if once:
            render.out().print(frame(view))
            return
        from rich.live import Live

        with Live(frame(view), console=render.out(), auto_refresh=False, screen=False) as live:
            try:
                while True:
                    time.sleep(max(0.2, interval))
                    live.update(frame(c.traffic(name, url, limit)), refresh=True)
            except KeyboardInterrupt:
                return
