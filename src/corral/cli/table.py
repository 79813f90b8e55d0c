"""Every command of ``corral``, its options and their help, as data.

Operators type ``corral ls`` all day, so starting the CLI must cost only what the one command
run needs. This table is what lets :mod:`corral.cli.app` list every command (``corral --help``)
and parse any one of them without importing a command module: each entry names the module and
function that runs it, and the module is imported for that command alone.

Each :class:`Arg` becomes one ``argparse`` argument whose ``dest`` is a parameter of the
command's function (a test holds the table and the functions' signatures to each other).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_HELP = "print plain JSON instead of a table"
WAIT_HELP = "seconds to follow the operation"


class Arg:
    """One argument. ``kind``: ``value`` (an option taking a value, or a positional),
    ``flag`` (present or not), ``toggle`` (``--x``/``--no-x``), ``append`` (a repeatable
    option, None when absent), ``rest`` (the last positional: any number of words, [] when
    none; what follows ``--`` goes there too), ``some`` (like ``rest``, at least one).
    (Plain classes, not NamedTuples or dataclasses: building those classes would cost more
    than parsing the command line.)"""

    __slots__ = ("choices", "default", "dest", "flags", "help", "kind", "metavar", "required",
                 "type")

    def __init__(self, flags: tuple[str, ...], help: str = "", kind: str = "value",
                 type: Callable[[str], Any] | None = None, default: Any = None,
                 dest: str | None = None, metavar: str | None = None,
                 choices: tuple[str, ...] | None = None, required: bool = False) -> None:
        self.flags = flags
        self.help = help
        self.kind = kind
        self.type = type
        self.default = default
        self.dest = dest
        self.metavar = metavar
        self.choices = choices
        self.required = required


class Command:
    """A command: ``corral.cli.<module>.<func>`` runs it with the parsed arguments."""

    __slots__ = ("args", "func", "help", "module")

    def __init__(self, module: str, func: str, help: str, args: tuple[Arg, ...] = ()) -> None:
        self.module = module
        self.func = func
        self.help = help
        self.args = args


class Group:
    """``corral NAME SUB ...``: a word that only groups commands."""

    __slots__ = ("commands", "help")

    def __init__(self, help: str, commands: dict[str, Command]) -> None:
        self.help = help
        self.commands = commands


def int_range(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in the range {low}<=x<={high}")
        return value

    convert.__name__ = "integer"
    return convert


def named(kind: str) -> Callable[[str], str]:
    """An argument that is an instance, host, image or token name: one that could never be
    valid (a '/', '..', a newline, unicode, too long) is refused here (exit 2) and never sent.
    The patterns are imported when such an argument is parsed, not for every command."""

    def convert(text: str) -> str:
        import argparse

        from corral.api.names import check

        try:
            return check(kind, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = f"{kind} name"
    return convert


def host_path(text: str) -> Path:
    """A path on a host (``--from``): no control character (a newline), not past PATH_MAX;
    the CLI makes it absolute itself, so '..' is fine here."""
    import argparse

    from corral.api.names import path_problem

    problem = path_problem(text, dotdot=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"path {text[:80]!r} {problem}")
    return Path(text)


host_path.__name__ = "path"
INSTANCE_NAME = named("instance")
HOST_NAME = named("host")


def opt(*flags: str, help: str = "", type: Callable[[str], Any] | None = None,
        default: Any = None, dest: str | None = None, **kw: Any) -> Arg:
    return Arg(flags, help, "value", type, default, dest, **kw)


def flag(*flags: str, help: str, dest: str | None = None) -> Arg:
    return Arg(flags, help, "flag", default=False, dest=dest)


def pos(name: str, help: str = "", kind: str = "value", type: Callable[[str], Any] | None = None,
        metavar: str | None = None, dest: str | None = None) -> Arg:
    return Arg((name,), help, kind, type, metavar=metavar, dest=dest)


JSON = flag("--json", help=JSON_HELP, dest="json_out")
NAMES = pos("names", "instance name(s)", kind="some", type=INSTANCE_NAME)
NAME = pos("name", type=INSTANCE_NAME)
SET = Arg(("--set",), "any setting as key=value (see docs/configuration.md)", "append",
          dest="set_")
CONFIG = opt("--config", help="TOML settings file", type=Path, dest="cfg")
LOG_LEVEL = opt("--log-level", help="debug, info, warning, error")
TOKEN = opt("--token", help="fleet token (or CORRAL_TOKEN)")


def wait(default: float, help: str = WAIT_HELP) -> Arg:
    return opt("--wait", help=help, type=float, default=default)


def _verb(module: str, func: str, help: str, *extra: Arg) -> Command:
    return Command(module, func, help, (NAMES, *extra, JSON))


#: command (or group) name -> what runs it, in the order ``corral --help`` lists them
COMMANDS: dict[str, Command | Group] = {
    "events": Command("events_cmd", "events", (
        "Every committed change of the fleet (instances, hosts, errors), oldest first.\n\n"
        "Without --since all kept events are shown; -f alone starts with the next new event."), (
        flag("--follow", "-f", help="keep printing new events"),
        opt("--since", help="10m, 2h, 1d, an ISO time or unix seconds"),
        opt("--after", help="only events after this index", type=int),
        Arg(("--type",), "event type or prefix, e.g. instance.state or host (repeatable)",
            "append", dest="type_"),
        opt("--instance", help="only this instance's events"),
        flag("--json", help="one JSON event per line", dest="json_out"),
    )),
    "server": Command("fleet_cmds", "server",
                      "Run the control plane (HTTP API, scheduler, embedded NATS unless --nats).", (
        opt("--data", help="data directory", type=Path),
        opt("--api-host", help="address of the HTTP API"),
        opt("--api-port", help="port of the HTTP API; 0 = free", type=int),
        opt("--nats", help="external NATS URL"),
        opt("--nats-host", help="embedded NATS address"),
        opt("--nats-port", help="embedded NATS port; 0 = free", type=int),
        opt("--nats-cluster-port", help="embedded NATS: port for the other nodes of its "
            "cluster (routes); 0 = no cluster", type=int),
        opt("--nats-routes", help="embedded NATS: the other nodes, comma-separated "
            "nats-route://HOST:PORT"),
        opt("--server-name", help="this server's node name in the NATS cluster (default: its "
            "id)"),
        opt("--db", help="SQLAlchemy URL (postgresql+psycopg://... for several servers)"),
        opt("--tls", help="on: HTTPS and TLS with the fleet's own CA (DATA/pki); off: "
            "loopback only", choices=("on", "off")),
        TOKEN, LOG_LEVEL, SET, CONFIG,
    )),
    "agent": Command("fleet_cmds", "agent",
                     "Run one host's agent: joins the fleet over NATS and runs its instances.", (
        opt("--name", help="host name"),
        opt("--nats", help="NATS URL of the fleet (default: the one enrollment gave)"),
        opt("--join", help="the one-time token from 'corral host add NAME' (first start)",
            dest="join_token"),
        opt("--server", help="the server's API, to enroll with (https://...)",
            dest="server_url"),
        opt("--ca-file", help="the fleet's CA certificate, to check the server with when "
            "enrolling"),
        TOKEN,
        opt("--data", help="data directory", type=Path),
        opt("--address", help="address other hosts reach"),
        opt("--drivers", help="comma-separated drivers"),
        LOG_LEVEL, SET, CONFIG,
    )),
    "up": Command("fleet_cmds", "up",
                  "Start a whole fleet on this machine: server, NATS and N agents.", (
        opt("--hosts", help="number of hosts (agents)", type=int, default=3),
        flag("--netns", help="root: each host in its own network namespace, with runc",
             dest="use_netns"),
        opt("--data", help="fleet directory (default ~/.local/share/corral/fleet; as root "
            "/var/lib/corral/fleet)", type=Path),
        opt("--timeout", help="seconds to wait for each step", type=float, default=60.0),
        flag("--tour", help="then show a short guided tour"),
        opt("--disk-backend", help="instance disks: dir (rsync) or btrfs (send/receive)",
            default="dir"),
        opt("--disk-root", help="host i keeps disks in DIR/host<i> (btrfs: on a btrfs "
            "filesystem)", type=Path),
        opt("--servers", help="corral servers, each with a node of the NATS cluster (more "
            "than one needs --postgres)", type=int, default=1),
        flag("--postgres", help="keep the fleet's database in a PostgreSQL server the rig "
             "starts (DATA/postgres), instead of SQLite"),
    )),
    "down": Command("fleet_cmds", "down", "Stop every instance, then the agents and the "
                    "server; remove the fleet's network.", (
        opt("--timeout", help="grace seconds for each instance", type=float, default=10.0),
    )),
    "rig": Group("The local fleet 'corral up' started: simulate what hosts go through.", {
        "kill-host": Command("fleet_cmds", "rig_kill_host",
                             "Kill a host the way a power cut would: its agent, fence keeper "
                             "and workloads with SIGKILL; the server fails its instances over "
                             "when its lease runs out. Disks stay.", (
            pos("name", "the host's name", type=HOST_NAME),)),
        "revive-host": Command("fleet_cmds", "rig_revive_host",
                               "Start a killed host's agent again (its recorded command); it "
                               "rejoins and its stale copies are removed.", (
            pos("name", "the host's name", type=HOST_NAME),
            opt("--timeout", help="seconds to wait for it to join", type=float, default=60.0),
        )),
    }),
    "status": Command("fleet_cmds", "status", "The fleet at a glance: server, bus, database, "
                      "hosts, instance counts.", (JSON,)),
    "run": Command("instances", "run",
                   "Create an instance and start it: corral run NAME OPTIONS -- CMD ARGS...", (
        pos("name", "instance name: lowercase letters, digits, dashes", type=INSTANCE_NAME),
        pos("command", "the workload's argv, after -- (with --image: replaces the image's "
            "command)", kind="rest"),
        opt("--cpus", help="CPU reservation, in cores", type=float, default=0.1),
        opt("--memory", help="memory reservation: 64M, 1G, 512Ki...", default="64M"),
        opt("--host", help="pin to this host", type=HOST_NAME),
        opt("--driver", help="process or runc (default: runc with --from or --image, else "
            "process)"),
        opt("--from", help="root filesystem directory (on the host)", type=host_path,
            dest="rootfs"),
        opt("--image", help="image to run from (see 'corral image ls'); not with --from",
            type=named("image")),
        opt("--entrypoint", help="replaces the image's entrypoint (and drops its command); "
            "'' for none"),
        Arg(("--env", "-e"), "KEY=VALUE, repeatable (laid over the image's env)", "append"),
        flag("--no-start", help="create without starting"),
        Arg(("--tail",), "capture a file too: SOURCE=PATH (inside the rootfs), repeatable",
            "append"),
        opt("--vip", help="virtual IP ADDR/PREFIX held while it runs; moves with failover"),
        opt("--restart", help="when its agent starts it again after it ends by itself: no "
            "(default), on-failure (crash, non-zero exit) or always",
            choices=("no", "on-failure", "always"), default="no"),
        opt("--restart-attempts", help="restarts allowed within --restart-interval, then it "
            "stays failed (default 3)", type=int),
        opt("--restart-interval", help="the window attempts are counted in: 30s, 5m, 1h "
            "(default 5m)"),
        opt("--restart-delay", help="wait before each restart: 0, 0.5, 10s, 1m "
            "(default 1s)"),
        opt("--check", help="health check run by its agent: http://:PORT/PATH, tcp::PORT or "
            "exec:CMD (with --restart on-failure/always an unhealthy one is restarted)"),
        opt("--check-interval", help="between checks: 5s, 1m (default 10s)"),
        opt("--check-timeout", help="one check's limit (default 2s)"),
        opt("--check-threshold", help="failures in a row that make it unhealthy (default 3)",
            type=int),
        opt("--check-grace", help="after each start, failures do not count for this long: "
            "30s, 2m (default 0)"),
        flag("--failover-on-unhealthy", help="with --check and a standby: when still "
             "unhealthy after its restart attempts, the server promotes its standby (at most "
             "once an hour; an event says why)"),
        opt("--count", help="run N such instances, NAME-1 .. NAME-N, placed together (one "
            "call per 500); each line says how its instance ended", type=int),
        JSON,
    )),
    "apply": Command("apply_cmd", "apply", (
        "Make the fleet match a fleet file: show the plan (create, recreate, migrate, "
        "standby), then act once confirmed.\n\nInstances the file does not list are never "
        "touched. A recreate (stop, rm, create: the disk starts empty) needs --yes. See "
        "docs/operations.md (Declarative fleet)."), (
        opt("-f", "--file", help="the fleet file (TOML, or JSON from 'corral export --json'; "
            "'-': stdin)", type=Path, dest="file",
            metavar="FILE"),
        flag("--schema", help="print the file's JSON Schema and exit"),
        flag("--yes", "-y", help="act without asking (needed for a recreate)"),
        flag("--dry-run", help="show the plan only"),
        wait(600.0, help="seconds to follow each operation (migrate, standby)"),
        JSON,
    )),
    "export": Command("apply_cmd", "export", "Write today's fleet as a fleet file that "
                      "'corral apply' accepts (and plans to nothing).", (JSON,)),
    "ls": Command("instances", "ls",
                  "List instances with their CPU (% of a core, % of the host) and memory.",
                  (opt("--limit", help="show at most this many (the first by name)",
                       type=int_range(1, 10**9)),
                   opt("--host", help="only the instances on this host", type=HOST_NAME),
                   opt("--state", help="only the instances in this state (running, stopped, "
                       "failed, ...)"),
                   JSON)),
    "show": Command("instances", "show",
                    "Everything about one instance, including what you can do with it next.",
                    (NAME, JSON)),
    "start": _verb("instances", "start", "Start stopped, exited or failed instances."),
    "stop": _verb("instances", "stop", "SIGTERM, then SIGKILL after the timeout.",
                  opt("--timeout", help="seconds before SIGKILL", type=float)),
    "restart": _verb("instances", "restart", "Stop (if running) and start again."),
    "freeze": _verb("instances", "freeze",
                    "Pause every process of the instance (cgroup freezer)."),
    "thaw": _verb("instances", "thaw", "Resume a frozen instance."),
    "kill": _verb("instances", "kill", "Send a signal to the whole instance.",
                  opt("--signal", "-s", help="name or number", default="KILL")),
    "rm": Command("instances", "rm", "Delete instances (they must be stopped, unless --force).",
                  (NAMES, flag("--force", "-f", help="stop it first if alive"))),
    "logs": Command("logs", "logs", "Print an instance's captured output (stdout, stderr and "
                    "tailed files), oldest first.", (
        pos("name", "instance name", type=INSTANCE_NAME),
        flag("--follow", "-f", help="keep printing new lines"),
        opt("--since", help="only lines from this far back (30s, 10m, 2h) or since a time "
            "(ISO 8601)"),
        opt("--source", help="stdout, stderr, or a source given with 'corral run --tail'"),
        flag("--json", help="one JSON object per line: ts, host, source, seq, line",
             dest="json_out"),
    )),
    "logsink": Command("logs", "logsink", (
        "Write every instance's lines to DIR/<instance>/<source>.log, exactly once, until "
        "stopped.\n\nA sink killed and started again resumes at its checkpoint: no line lost, "
        "none written twice; gaps in a source's numbering are recorded in DIR/gaps.jsonl. Run "
        "two for two places."), (
        Arg(("--dir",), "where the per-instance files go", type=Path, dest="directory",
            required=True),
        opt("--name", help="this sink's name (its durable consumer and checkpoint); default: "
            "the dir's name"),
    )),
    "recreate": Command("ops_cmd", "recreate", (
        "Stop, delete and create an instance again (on its host or --to another), starting it "
        "again if it was running; any failure puts it back where it was."), (
        NAME, opt("--to", help="create it on this host instead", type=HOST_NAME), wait(600.0),
        JSON)),
    "shelve": Command("shelve_cmd", "shelve", (
        "Snapshot an instance's disk into the image store and release its CPU and memory; its "
        "disk stays on the host until the offload delay, for a fast unshelve there."), (
        NAME,
        opt("--offload-after", help="keep the disk on its host this long (1h, 30m, 0 = remove "
            "at once, never); default: the server's shelved_offload_seconds"),
        wait(600.0), JSON)),
    "unshelve": Command("shelve_cmd", "unshelve", (
        "Bring shelved instances back: on the old host when the disk is there and it fits, "
        "else where the scheduler says (fetching only the chunks that host lacks)."), (
        pos("names", "instance name(s)", kind="rest", type=INSTANCE_NAME),
        flag("--all", help="every shelved instance", dest="all_"),
        opt("--to", help="unshelve on this host", type=HOST_NAME),
        opt("--parallel", help="operations in flight", type=int_range(1, 64), default=8),
        wait(1800.0, "seconds to wait for all of them"),
        JSON)),
    "shelved": Command("shelve_cmd", "shelved", "Shelved instances: where their disk is kept "
                       "and until when, and what they store.", (JSON,)),
    "migrate": Command("standby_cmd", "migrate", (
        "Move an instance and its disk to another host (warm: copy while it runs, then a short "
        "freeze); any failure leaves it running where it was and the target clean."), (
        NAME,
        opt("--to", help="target host (default: the scheduler's pick)", type=HOST_NAME),
        flag("--cold", help="stop first, then copy"),
        wait(3600.0), JSON)),
    "top": Command("top", "top", "Live CPU and memory of every instance, with each host's sum "
                   "and rest (Ctrl-C quits).", (
        opt("--sort", help="cpu, mem or name", default="cpu", choices=("cpu", "mem", "name")),
        flag("--once", help="print one frame and exit"),
        opt("--interval", help="seconds between refreshes", type=float, default=1.0),
        JSON)),
    "traffic": Command("traffic_cmd", "traffic", (
        "Requests/s, status-code rates and who's online, from the instance's access log "
        "(captured with 'corral run --tail access=PATH'); Ctrl-C quits."), (
        pos("name", "the instance", type=INSTANCE_NAME),
        opt("--url", help="list this URL's clients, latest first"),
        opt("--limit", help="at most this many clients", type=int_range(1, 10_000),
            default=30),
        opt("--interval", help="seconds between refreshes", type=float, default=1.0),
        flag("--once", help="print one frame and exit"),
        JSON)),
    "metrics": Command("metrics_cmd", "metrics", (
        "CPU and memory of an instance (or, with --host, a host) over time, from the "
        "server's history: a line of each over the whole range, then the latest points."), (
        pos("name", "the instance (or the host, with --host)"),
        opt("--since", help="start: 30m, 2h, 1d, 30d, an ISO time or unix seconds",
            default="1h"),
        opt("--until", help="end, in the same forms (default now)"),
        flag("--host", help="NAME is a host: the sum of its instances", dest="host"),
        opt("--rows", help="show the latest this many points (0: none)",
            type=int_range(0, 5000), default=12),
        JSON)),
    "host": Group("Hosts of the fleet.", {
        "ls": Command("fleet_cmds", "host_ls",
                      "Hosts with their capacity, reservations and CPU use.", (JSON,)),
        "add": Command("fleet_cmds", "host_add",
                       "A one-time join token (good for an hour) for a new host: start its "
                       "agent with --join TOKEN --server URL.", (
            pos("name", "the host's name"), JSON)),
        "rm": Command("fleet_cmds", "host_rm",
                      "Revoke a host (its bus connection is closed) and forget it; refused "
                      "while it is up or instances, standbys or kept disks are there (drain "
                      "it first).", (pos("name", "the host's name"),)),
        "drain": Command("drain_cmd", "drain", (
            "Mark a host draining (nothing new is placed there) and move everything off it: "
            "instances (warm migration), standbys, kept disks (once safe in the store)."), (
            pos("name", "the host's name", type=HOST_NAME),
            opt("--deadline", help="fail what is not moved by then (10m, 1h); it stays "
                "where it is, running"),
            opt("--parallel", help="moves in flight", type=int_range(1, 64), default=4),
            wait(86400.0, "seconds to follow it (it goes on on the server after)"), JSON)),
        "undrain": Command("drain_cmd", "undrain", "Clear a host's drain mark: the scheduler "
                           "may place on it again.", (pos("name", "the host's name",
                                                          type=HOST_NAME), JSON)),
    }),
    "image": Group("Images: content-addressed root filesystems.", {
        "import": Command("images", "import_", "Import a directory or tarball as an image "
                          "(uploads only the chunks the store lacks).", (
            pos("name", "image name", type=named("image")),
            pos("path", "a root directory or a tar archive", type=Path),
            Arg(("--replace",), "replace an image of that name", "toggle", default=False),
        )),
        "pull": Command("images", "pull", (
            "Pull a standard (OCI or Docker) image into the store, its config kept for 'corral "
            "run --image' (entrypoint, command, env, user, workdir, stop signal).\n\nREF is "
            "docker://REGISTRY/REPO:TAG, oci:DIR[:TAG], oci-archive:FILE or "
            "docker-archive:FILE; skopeo moves it, corral checks every blob's digest and size "
            "and applies the layers here, and the server gets only the chunks it lacks. A "
            "failed pull stores nothing."), (
            pos("ref", "the image to pull"),
            opt("--name", help="image name in the store (default: the reference's last "
                "part with its tag, e.g. web:1.2)", type=named("image")),
            opt("--authfile", help="registry credentials (containers-auth.json format, as "
                "'skopeo login' and 'podman login' write it)"),
            flag("--insecure", help="the registry speaks plain HTTP or has a certificate "
                 "not trusted here"),
            Arg(("--replace",), "replace an image of that name", "toggle", default=False),
        )),
        "push": Command("images", "push", "Push an image of the store to a registry as one "
                        "layer, with the config it was pulled with.", (
            pos("name", "image name", type=named("image")),
            pos("ref", "where to: docker://REGISTRY/REPO:TAG, oci:DIR[:TAG], "
                "oci-archive:FILE or docker-archive:FILE"),
            opt("--authfile", help="registry credentials (containers-auth.json format)"),
            flag("--insecure", help="the registry speaks plain HTTP or has a certificate "
                 "not trusted here"),
        )),
        "ls": Command("images", "ls", "Images with their source, digest, size, unique size "
                      "and dedup ratio.", (JSON,)),
        "rm": Command("images", "rm", "Remove images (their chunks are freed by 'corral image "
                      "gc').", (pos("names", "image name(s)", kind="some", type=named("image")),)),
        "verify": Command("images", "verify", "Read back every stored chunk; list damage and "
                          "the images it breaks (exit 11 if any).", (JSON,)),
        "gc": Command("images", "gc", "Free the chunks no image uses any more.", (JSON,)),
    }),
    "ops": Group("Operations: durable multi-step actions and their steps.", {
        "ls": Command("ops_cmd", "ops_ls", "Operations, newest first.", (
            opt("--target", help="only this instance's"),
            opt("--limit", help="at most this many", type=int, default=50),
            JSON)),
        "show": Command("ops_cmd", "ops_show", "One operation: its steps with states and "
                        "timings, its error and the hooks that ran.", (
            pos("op_id", metavar="ID"), JSON)),
    }),
    "standby": Group("Warm standbys: copies of an instance's disk on another host.", {
        "add": Command("standby_cmd", "standby_add", "Keep a warm copy of NAME's disk on "
                       "another host, refreshed every --every.", (
            NAME,
            opt("--host", help="standby host (default: the scheduler's pick, never its own)",
                type=HOST_NAME),
            opt("--every", help="refresh interval, e.g. 60s, 5m", default="60s"),
            wait(3600.0), JSON)),
        "sync": Command("standby_cmd", "standby_sync", "Refresh NAME's standby now.",
                        (NAME, wait(3600.0), JSON)),
        "promote": Command("standby_cmd", "standby_promote", (
            "Planned switch: last refresh, stop the primary, start the standby; the old "
            "primary's disk becomes the new standby."), (NAME, wait(3600.0), JSON)),
        "rm": Command("standby_cmd", "standby_rm",
                      "Stop keeping a standby of NAME and remove its copy.", (NAME,)),
        "ls": Command("standby_cmd", "standby_ls", "Every standby: where, state, last sync, "
                      "data age, last freeze and bytes moved.", (JSON,)),
    }),
    "token": Group("API tokens: named bearer tokens with a role (admin, read-only, host).", {
        "create": Command("tokens_cmd", "create", (
            "Make a named API token and print it, once: it is not kept (only a hash of it "
            "is), so store it now.\n\nRoles: admin (everything, the default), read-only (GET "
            "routes only: dashboards, monitoring), host (only what an agent asks of the image "
            "store). Use it as CORRAL_TOKEN or 'Authorization: Bearer TOKEN'."), (
            pos("name", "the token's name (to list and revoke it by)", type=named("token")),
            flag("--read-only", help="GET routes only (same as --role read-only)",
                 dest="read_only"),
            opt("--role", help="admin, read-only or host [default: admin]",
                choices=("admin", "read-only", "host")),
            JSON)),
        "ls": Command("tokens_cmd", "ls", "Named tokens with their role and age (never their "
                      "secrets; the fleet token is not listed).", (JSON,)),
        "rm": Command("tokens_cmd", "rm", "Revoke a token: the next request carrying it is "
                      "refused.", (pos("name", "the token's name", type=named("token")),)),
    }),
    "systemd": Group("The systemd units corral ships (see docs/operations.md).", {
        "print": Command("systemd_cmd", "print_unit", (
            "Write a shipped unit to stdout: corral systemd print corral-agent > "
            "/etc/systemd/system/corral-agent.service\n\nUnits: corral-server, corral-agent. "
            "Without 'UNIT', lists them."), (
            pos("unit", "corral-server or corral-agent (.service optional)", kind="rest"),
            opt("--bin", help="the corral executable ExecStart= runs "
                              "[default: /usr/local/bin/corral]", dest="corral_bin"))),
    }),
}
