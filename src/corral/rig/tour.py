"""``corral up --tour``: a guided walk through what corral exists for, on a fresh local fleet.

Accounting, a warm standby, a migration, the failover of a host the tour kills, logs and live
traffic of a small web server, shelving, the events of it all, the dashboard. It uses the
public API client (what a user's own scripts would use) and the process driver, so it works
without root, and it prints the command a user would type before each step, then the figures
corral gave. A step a driver or this machine cannot do is shown with corral's own error and the
tour goes on: it never fails on one. It cleans up what it made, even on Ctrl-C, and a host it
killed is started again. The web server and the host's death are in :mod:`corral.rig.tour_web`
and :mod:`corral.rig.hostkill`.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.rule import Rule

from corral.api.client import Client
from corral.api.models import CreateInstance, OperationView
from corral.cli import render
from corral.errors import CorralError, NotFound
from corral.rig import hostkill, tour_web
from corral.rig.context import ca_file, load_context, resolve

BURNER = "tour-burner"
IDLER = "tour-idle"
DB = "tour-db"
WEB = "tour-web"
NAMES = (BURNER, IDLER, DB, WEB)
BURN_CMD = ["sh", "-c", "while :; do :; done"]
IDLE_CMD = ["sleep", "3600"]
#: a workload whose disk holds data worth keeping: 1 MiB written once, then a record every 0.2 s
DB_CMD = ["sh", "-c", "[ -f blob.bin ] || head -c 1048576 /dev/urandom > blob.bin; i=0; "
          "while :; do i=$((i+1)); echo \"record $i $(date +%s)\" >> data.log; sleep 0.2; "
          "done"]
#: every wait of the tour is bounded by this many seconds
WAIT = 60.0
T = TypeVar("T")
#: the events step lists these (and each operation's end); the rest it counts
EVENT_TYPES = frozenset({"host.down", "host.up", "instance.failover", "instance.failover_failed",
                         "instance.lost_needs_restore", "instance.stale_copy_removed",
                         "instance.error", "instance.deleted"})
OP_ENDS = frozenset({"succeeded", "rolled_back", "needs_attention"})


def _step(console: Console, title: str, cmd: str) -> None:
    console.print(Rule(title, style="cyan"))
    for line in cmd.split("\n"):
        console.print(f"[dim]$[/dim] [bold]{line}[/bold]", highlight=False)


def _until(probe: Callable[[], T | None], timeout: float = WAIT, every: float = 0.25
           ) -> T | None:
    """``probe()`` until it returns something, at most ``timeout`` seconds (None then)."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None or time.monotonic() > deadline:
            return got
        time.sleep(every)


def _follow(c: Client, op: OperationView, wait: float = WAIT) -> OperationView:
    """The operation once it finished (or after ``wait``), through the server's events."""
    first = op.model_dump(mode="json")
    last = first
    for seen in c.watch_op(first, time.monotonic() + wait):
        last = seen
    return OperationView.model_validate(last)


def _op_line(console: Console, o: OperationView) -> bool:
    """Print the operation's steps with their times; True when it succeeded."""
    steps = ", ".join(f"{s.name} {s.ended_at - s.started_at:.2f}s" for s in o.steps
                      if s.started_at is not None and s.ended_at is not None)
    console.print(f"[dim]{o.kind} {o.id}: {o.state} ({steps})[/dim]", highlight=False)
    if o.state != "succeeded":
        msg = (o.error or {}).get("message") or o.state
        console.print(f"[red]error:[/red] {msg}", highlight=False)
        console.print(f"[dim]see: corral ops show {o.id}[/dim]")
    return o.state == "succeeded"


def _shown(console: Console, fn: Callable[[], T]) -> T | None:
    """Run one call of a step; corral's refusal is shown (as the CLI would) and None returned."""
    try:
        return fn()
    except CorralError as exc:
        render.report_error(exc, console)
        return None


def _cleanup(c: Client) -> None:
    for name in NAMES:
        with contextlib.suppress(NotFound, CorralError):
            c.delete(name, force=True)


class Tour:
    """The steps, in order, and what they share: the hosts (the first dies in step 4, the
    second keeps the standby and receives the migration, so the death takes nothing else with
    it), the web server's port, and where the tour's events begin."""

    def __init__(self, console: Console, c: Client, token: str) -> None:
        self.console = console
        self.c = c
        self.token = token
        self.hosts = sorted(h.name for h in c.hosts() if h.state == "up")
        #: the host the tour killed and has not started again yet
        self.killed: str | None = None
        self.first_event = max((e.index for e in c.events()), default=0)
        self.port = tour_web.free_port()
        self.addresses = {h.name: h.address for h in c.hosts()}
        on_loopback = set(self.addresses.values()) <= {"127.0.0.1"}
        self.bind = "127.0.0.1" if on_loopback else "0.0.0.0"

    def get(self, path: str) -> int | None:
        """``GET path`` of the web server, at the address of the host it runs on now."""
        with contextlib.suppress(CorralError):
            host = self.c.instance(WEB).host
            if host is not None:
                return tour_web.get(self.addresses.get(host, "127.0.0.1"), self.port, path)
        return None

    # -- 1 -------------------------------------------------------------------------------------
    def accounting(self) -> None:
        console, c = self.console, self.c
        _step(console, "1. accounting: what each instance costs",
              f"corral run {BURNER} --cpus 1 -- {shlex.join(BURN_CMD)}\n"
              f"corral run {IDLER} -- {shlex.join(IDLE_CMD)}\ncorral ls")
        for name, cmd, cpus in ((BURNER, BURN_CMD, 1.0), (IDLER, IDLE_CMD, 0.1)):
            view = c.create(CreateInstance(name=name, command=cmd, cpus=cpus))
            console.print(f"{view.name}: {view.state} on {view.host}")
        console.print("[dim]sampling for a few seconds...[/dim]")
        # a rate needs two samples; the first one may cover the burner's start, so one more
        _until(lambda: True if (c.instance(BURNER).usage.cpu_core_pct or 0) > 10 else None, 15)
        time.sleep(2.0)
        burner = c.instance(BURNER)
        idle = _until(lambda: v if (v := c.instance(IDLER)).usage.cpu_core_pct is not None
                      else None, 5) or c.instance(IDLER)
        items = [i for i in c.instances() if i.name in (BURNER, IDLER)]
        console.print(render.instances_table(sorted(items, key=lambda i: i.name)))
        for v in (burner, idle):
            console.print(f"accounting: {v.name} uses {render.fmt_pct(v.usage.cpu_core_pct)}% "
                          f"of a core, {render.fmt_pct(v.usage.cpu_host_pct)}% of {v.host}",
                          highlight=False)
        console.print(f"[dim]$[/dim] [bold]corral thaw {IDLER}[/bold]  [dim](the lifecycle "
                      "refuses what makes no sense)[/dim]")
        _shown(console, lambda: c.action(IDLER, "thaw"))
        for name in (BURNER, IDLER):
            c.delete(name, force=True)
        console.print(f"[dim]$ corral rm --force {BURNER} {IDLER}[/dim]")

    # -- 2 -------------------------------------------------------------------------------------
    def standby(self) -> bool:
        """tour-db on the first host with a warm copy on the second; True when it is ready."""
        console, c = self.console, self.c
        home, spare = self.hosts[0], self.hosts[1]
        _step(console, "2. a warm standby: a copy of an instance's disk on another host",
              f"corral run {DB} --host {home} -- {shlex.join(DB_CMD)}\n"
              f"corral standby add {DB} --host {spare} --every 1h\n"
              f"corral standby sync {DB}\ncorral standby ls")
        c.create(CreateInstance(name=DB, command=DB_CMD, host=home, cpus=0.05))
        _until(lambda: True if c.instance(DB).state == "running" else None, 15)
        time.sleep(1.0)  # a few records in its disk
        first = _shown(console, lambda: _follow(c, c.standby_add(DB, spare, 3600.0)))
        if first is None or not _op_line(console, first):
            return False
        self._moved("first copy", first)
        time.sleep(1.0)
        again = _shown(console, lambda: _follow(c, c.standby_op(DB, "sync")))
        if again is not None and _op_line(console, again):
            self._moved("refresh (only what changed)", again)
        sb = next((s for s in c.standbys() if s.instance == DB), None)
        if sb is None:
            return False
        freeze = "-" if sb.last_freeze_ms is None else f"{sb.last_freeze_ms:.1f} ms"
        age = "-" if sb.data_age_seconds is None else f"{sb.data_age_seconds:.1f} s"
        console.print(f"standby: {DB} on {sb.host}, {sb.state}, freeze {freeze}, data age "
                      f"{age}, {sb.syncs} syncs, {render.fmt_bytes(sb.total_bytes)} in all",
                      highlight=False)
        return sb.state == "ready"

    def _moved(self, what: str, o: OperationView) -> None:
        r = o.result or {}
        parts = [f"{what}: moved {render.fmt_bytes(int(r.get('bytes') or 0))} "
                 f"(bytes={int(r.get('bytes') or 0)})"]
        if r.get("freeze_ms") is not None:
            parts.append(f"frozen {float(r['freeze_ms']):.1f} ms")
        if r.get("downtime_ms") is not None:
            parts.append(f"downtime {float(r['downtime_ms']):.0f} ms "
                         f"(downtime_ms={float(r['downtime_ms']):.0f})")
        self.console.print(", ".join(parts), highlight=False)

    # -- 3 -------------------------------------------------------------------------------------
    def migration(self) -> None:
        """The web server starts away from the standby's host and migrates to it, so the host
        the tour kills next runs nothing but the instance with a standby."""
        console, c = self.console, self.c
        spare = self.hosts[1] if len(self.hosts) > 1 else self.hosts[0]
        start = self.hosts[2] if len(self.hosts) > 2 else self.hosts[0]
        argv = tour_web.command(self.port, self.bind)
        _step(console, "3. a migration: stop here, start there, with the disk",
              f"corral run {WEB} --host {start} --tail access=access.log -- "
              f"python3 -c '<a small web server writing access.log>' {self.port}\n"
              f"corral migrate {WEB} --to {spare}")
        c.create(CreateInstance(name=WEB, command=argv, host=start, cpus=0.05,
                                tail={"access": tour_web.ACCESS_LOG}))
        _until(lambda: True if self.get("/") is not None else None, 15)
        if spare == start:
            console.print("[dim](one host: nowhere to migrate to; corral up --hosts 3 --tour)"
                          "[/dim]")
            return
        o = _shown(console, lambda: _follow(c, c.migrate(WEB, spare)))
        if o is not None and not _op_line(console, o) and c.instance(WEB).host != spare:
            console.print(f"[dim]$[/dim] [bold]corral migrate {WEB} --to {spare} --cold[/bold]"
                          "  [dim](stop first, then one copy: no freeze needed)[/dim]")
            o = _shown(console, lambda: _follow(c, c.migrate(WEB, spare, cold=True)))
            if o is not None:
                _op_line(console, o)
        if o is not None and o.state == "succeeded":
            self._moved(f"migration of {WEB} {start} -> {spare}", o)

    # -- 4 -------------------------------------------------------------------------------------
    def failover(self, ready: bool) -> None:
        console, c = self.console, self.c
        dead, spare = self.hosts[0], self.hosts[1]
        _step(console, f"4. failover: {dead} dies, {DB} comes back on its standby's host",
              f"corral rig kill-host {dead}\ncorral ops ls --target {DB}\ncorral ls\n"
              f"corral rig revive-host {dead}")
        ctx = load_context()
        if ctx is None:
            console.print("[yellow]no local fleet context: this step needs the fleet 'corral "
                          "up' started[/yellow]")
            return
        if not ready:
            console.print(f"[yellow]{DB} has no ready standby: it will be lost until {dead} "
                          "returns[/yellow]")
        before = c.instance(DB)
        killed = hostkill.kill_host(ctx, dead)
        self.killed = dead
        t0 = time.monotonic()
        console.print(f"killed {dead}: its agent (pid {killed.agent_pid}), "
                      f"{len(killed.keepers)} fence keeper(s), "
                      f"{', '.join(n for n, _ in killed.workloads) or 'no workload'}",
                      highlight=False)
        down = _until(lambda: True if {h.name: h.state for h in c.hosts()}.get(dead) == "down"
                      else None, 30)
        if down:
            console.print(f"{dead} marked down by the server after {time.monotonic() - t0:.1f} s"
                          " (its lease ran out)")
        moved = _until(lambda: v if (v := c.instance(DB)).host == spare
                       and v.state == "running" else None, 45 if ready else 0)
        if moved is not None:
            took = time.monotonic() - t0
            op = next((o for o in c.ops(target=DB) if o.kind == "failover"), None)
            if op is not None:
                _op_line(console, op)
                data_at = (op.result or {}).get("data_at")
                lost = "-" if data_at is None else f"{max(0.0, time.time() - took - data_at):.1f}"
                console.print(f"failover: {DB} moved from {dead} to {moved.host} in {took:.1f} s"
                              f" after the death (epoch {before.epoch} -> {moved.epoch}); it "
                              f"went back to the standby's last sync, {lost} s before the death",
                              highlight=False)
            console.print(render.instances_table([moved]))
        elif ready:
            console.print(f"[red]{DB} did not come back on {spare} within 45 s[/red]")
        self.revive()

    def revive(self) -> None:
        if self.killed is None:
            return
        host, self.killed = self.killed, None
        ctx = load_context()
        if ctx is None:
            self.console.print(f"[yellow]start {host} again with: corral rig revive-host "
                               f"{host}[/yellow]")
            return
        agent = hostkill.revive_host(ctx, host)
        back = _until(lambda: True if {h.name: h.state for h in self.c.hosts()}.get(host)
                      == "up" else None, 30)
        self.console.print(f"{host}: agent started again (pid {agent.pid}), "
                           f"{'up' if back else 'not up yet'}", highlight=False)
        removed = _until(lambda: next(iter(self.c.events(
            after=self.first_event, types=["instance.stale_copy_removed"], instance=DB)), None),
            10)
        if removed is None:
            return
        self.console.print(f"{host}: its stale copy of {DB} was removed, its disk kept aside "
                           "(it may hold writes after the last sync)", highlight=False)
        for kept in _until(lambda: hostkill.set_aside(ctx, host, DB) or None, 5) or []:
            try:
                shutil.rmtree(kept)
                self.console.print(f"[dim]the tour removes its own {kept}[/dim]",
                                   highlight=False)
            except OSError as exc:
                self.console.print(f"[yellow]could not remove {kept} ({exc}): remove it by "
                                   "hand[/yellow]", highlight=False)

    # -- 5 -------------------------------------------------------------------------------------
    def web(self) -> None:
        console, c = self.console, self.c
        paths = ["/", "/index.html", "/blob.bin", "/index.html", "/no-such-page", "/"]
        where = self.addresses.get(c.instance(WEB).host or "", "127.0.0.1")
        _step(console, "5. logs and live traffic of a small web server",
              "\n".join(f"curl -s http://{where}:{self.port}{p}" for p in paths[:2])
              + f"  ... ({len(paths)} requests)\ncorral logs {WEB}\ncorral traffic {WEB}")
        base = c.traffic(WEB).hits
        codes = [self.get(p) for p in paths]
        console.print("requests: " + ", ".join(f"{p} {code}" for p, code in zip(paths, codes,
                                                                                  strict=True)),
                      highlight=False)
        view = _until(lambda: v if (v := c.traffic(WEB)).hits >= base + len(paths) else None,
                      20)
        lines = [x for x in c.logs(WEB)]
        for x in lines[-(len(paths) + 2):]:
            console.print(f"[dim]{x.get('host')} {x.get('source'):>6}[/dim] {x.get('line')}",
                          highlight=False)
        from corral.cli.traffic_cmd import frame

        view = view or c.traffic(WEB)
        console.print(frame(view))
        console.print(f"traffic: {view.hits} requests, {view.online} client(s) online",
                      highlight=False)

    # -- 6 -------------------------------------------------------------------------------------
    def shelve(self) -> None:
        console, c = self.console, self.c
        _step(console, "6. shelve and unshelve: no CPU, no memory, the disk in the image store",
              f"corral shelve {WEB} --offload-after 0\ncorral shelved\ncorral unshelve {WEB}")
        o = _shown(console, lambda: _follow(c, c.shelve(WEB, 0.0)))
        if o is None or not _op_line(console, o):
            return
        r = o.result or {}
        console.print(f"shelve: {WEB} stored {render.fmt_bytes(r.get('size'))} in "
                      f"{r.get('files', '?')} files, uploaded "
                      f"{render.fmt_bytes(r.get('uploaded_bytes'))} "
                      f"(bytes={int(r.get('uploaded_bytes') or 0)}, "
                      f"size={int(r.get('size') or 0)}); its disk left {r.get('host')}",
                      highlight=False)
        u = _shown(console, lambda: _follow(c, c.unshelve(WEB)))
        if u is None or not _op_line(console, u):
            return
        r = u.result or {}
        console.print(f"unshelve: {WEB} on {r.get('host')}, fetched "
                      f"{r.get('fetched_chunks')} chunks, "
                      f"{render.fmt_bytes(r.get('fetched_bytes'))} "
                      f"(bytes={int(r.get('fetched_bytes') or 0)})", highlight=False)
        code = _until(lambda: self.get("/"), 15)
        console.print(f"GET / after unshelve: {code}", highlight=False)

    # -- 7, 8 ----------------------------------------------------------------------------------
    def events(self) -> None:
        console = self.console
        _step(console, "7. the events of all of it", f"corral events --after {self.first_event}")
        got = list(self.c.events(after=self.first_event))
        shown = [e for e in got if e.type in EVENT_TYPES or (
            e.type == "operation.changed" and e.data.get("state") in OP_ENDS)]
        for e in shown:
            what = e.data.get("kind") or e.data.get("to") or e.data.get("message") or ""
            state = e.data.get("state") or ""
            console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(e.ts))}[/dim] "
                          f"{e.index:>5} {e.type:<28} {e.host or '-':<7} {e.instance or '-':<12}"
                          f" {what} {state}", highlight=False)
        counts = Counter(e.type for e in got)
        console.print(f"events: {len(got)} in all: "
                      + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())),
                      highlight=False)

    def dashboard(self) -> None:
        _step(self.console, "8. the dashboard", "open the URL below in a browser")
        self.console.print(f"dashboard: {self.c.base_url}/?token={self.token}", highlight=False,
                           soft_wrap=True)

    def run(self) -> None:
        self.accounting()
        if len(self.hosts) < 2:
            self.console.print("[yellow]standby, migration and failover need two hosts: "
                               "corral up --hosts 3 --tour[/yellow]")
            self.migration()
        else:
            ready = self.standby()
            self.migration()
            self.failover(ready)
        self.web()
        self.shelve()
        self.events()


def run_tour(console: Console, client: Client | None = None) -> None:
    """Print the tour; raises only if the fleet itself is broken. What it made is removed and
    a host it killed started again, however it ends (Ctrl-C included)."""
    url, token = resolve()
    if client is None:
        client = Client(url, token, ca_file=ca_file())
    with client as c:
        _cleanup(c)  # a previous tour interrupted halfway
        tour = Tour(console, c, token)
        try:
            tour.run()
        finally:
            try:
                tour.revive()
            finally:
                _cleanup(c)
    console.print(Rule("your turn", style="green"))
    console.print("  [bold]corral top[/bold]    live CPU of every instance (q: Ctrl-C)\n"
                  "  [bold]corral run NAME -- CMD[/bold]   start your own workload\n"
                  "  [bold]corral down[/bold]   stop every instance and the fleet")
    tour.dashboard()
