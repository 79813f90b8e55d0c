"""Instance operations: create (place, then ask the agent), lifecycle verbs, delete.

Each operation checks the lifecycle table against the *observed* state first, records the
operator's wish as the desired state, then asks the agent and applies the agent's report. The
database transaction never spans a bus call: state is committed before the call (so a crash in
between leaves an honest record) and updated after it from what the agent answered.

A create whose agent call fails never leaves a silent half-instance: when the agent refused,
nothing was made and the row is removed; when the agent did not answer, the outcome is unknown,
so the instance is kept as ``failed`` and the error says so.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.models import ActionRequest, CreateInstance
from corral.bus import rpc
from corral.bus.messages import InstanceReport, WireSpec
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance
from corral.control.fleet import Fleet
from corral.errors import Conflict, CorralError, HostUnavailable, InvalidRequest, NotFound
from corral.images import oci_config
from corral.images.store import ImageStore
from corral.lifecycle import ALIVE, State, Verb, check_verb
from corral.ops import locks
from corral.ops.locks import LockSet
from corral.scheduling.placement import Placer, Request

log = logging.getLogger(__name__)

#: a batch of creates asks this many agents at once
BATCH_PARALLEL = 64
#: and places, records and reads its instances this many to a transaction, letting the loop
#: answer heartbeats between (500 in one went past a second of the loop at 1000 hosts)
BATCH_CHUNK = 100
#: the moves a batch records for one instance (state, the agent's report)
Steps = list[tuple[State, InstanceReport | None]]


@dataclass(frozen=True)
class Created:
    """One instance of a batch: its row once made (None: nothing was kept), and its error."""

    name: str
    instance: Instance | None
    error: CorralError | None

DESIRED: dict[Verb, State] = {
    Verb.START: State.RUNNING,
    Verb.RESTART: State.RUNNING,
    Verb.THAW: State.RUNNING,
    Verb.STOP: State.STOPPED,
    Verb.KILL: State.STOPPED,
    Verb.FREEZE: State.FROZEN,
}


def reword(exc: CorralError, message: str, hint: str) -> CorralError:
    """The same kind of error (code, status) with a message that says what happened here."""
    return type(exc)(f"{message}: {exc.message}", hint=hint, retryable=exc.retryable,
                     details=exc.details)


class InstanceService:
    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings) -> None:
        self.fleet = fleet
        self.agents = agents
        #: told of every verb that fails (instance, verb, error), e.g. to publish an event
        self.on_error: Callable[[str, str, CorralError], None] | None = None
        self.settings = settings
        #: awaited with the name before an instance is removed (e.g. its standby copy goes)
        self.before_delete: list[Callable[[str], Awaitable[None]]] = []
        #: whether the image store holds an image of that name (set by the server once its
        #: store is open); None = no store, so an image-based create is refused.
        self.image_exists: Callable[[str], bool] | None = None
        #: the store itself (set with ``image_exists``): a create reads the image's config
        #: and, for its User, its /etc/passwd and /etc/group
        self.image_store: ImageStore | None = None

    @contextlib.contextmanager
    def _busy(self, name: str, verb: str = "") -> Iterator[None]:
        """Hold the instance for the verb (a second verb or an operation meanwhile is told
        who holds it); a verb that fails is reported to ``on_error``."""
        try:
            with self.fleet.locks.holding(f"verb:{verb}:{uuid.uuid4().hex[:8]}",
                                          LockSet.of([locks.instance(name)]),
                                          f"'corral {verb or 'a verb'}'"):
                yield
        except CorralError as exc:
            if self.on_error is not None:
                self.on_error(name, verb, exc)
            raise

    @staticmethod
    def _get(s: Session, name: str) -> Instance:
        inst = s.get(Instance, name)
        if inst is None:
            raise NotFound(f"no instance named '{name}'", hint="see 'corral ls'")
        return inst

    def get(self, name: str) -> Instance:
        with self.fleet.sessions() as s:
            return self._get(s, name)

    def exists(self, name: str) -> bool:
        with self.fleet.sessions() as s:
            return s.get(Instance, name) is not None

    def page(self, limit: int | None, after: str | None = None, host: str | None = None,
             state: str | None = None) -> Sequence[Instance]:
        """At most ``limit`` instances named after ``after``, by name, optionally only those
        on ``host`` or in ``state``. The order, the cursor and the limit are the database's
        (a range of the primary key), so a page reads O(page) rows however large the fleet;
        the order is the database's collation, the same one ``name > after`` compares in,
        so pages never overlap or skip."""
        query = select(Instance).order_by(Instance.name)
        if after is not None:
            query = query.where(Instance.name > after)
        if host is not None:
            query = query.where(Instance.host == host)
        if state is not None:
            query = query.where(Instance.state == state)
        if limit is not None:
            query = query.limit(limit)
        with self.fleet.sessions() as s:
            return list(s.scalars(query))

    def _after(self, name: str, target: State, report: InstanceReport | None) -> None:
        """Record a verb's outcome: its target state, then whatever the agent observed."""
        self.fleet.move(name, target, report=report)

    def _host_up(self, s: Session, inst: Instance) -> str:
        host = s.get(Host, inst.host) if inst.host else None
        if host is None or host.state != "up":
            raise HostUnavailable(
                f"host {inst.host} of instance '{inst.name}' is down",
                hint="wait for its agent to re-join (see 'corral host ls')",
            )
        return host.name

    # --- create -----------------------------------------------------------------------------

    async def create(self, req: CreateInstance) -> Instance:
        with self._busy(req.name, "create"):
            now = self.fleet.clock()
            if self.exists(req.name):  # (checked again below, with the row written)
                raise Conflict(f"an instance named '{req.name}' already exists",
                               hint="pick another name, or remove it first ('corral rm')")
            if req.image is not None:
                self._check_image(req.image)
            run = await asyncio.to_thread(self._resolve, req)
            with self.fleet.sessions.begin() as s:
                if s.get(Instance, req.name) is not None:
                    raise Conflict(f"an instance named '{req.name}' already exists",
                                   hint="pick another name, or remove it first ('corral rm')")
                target = self.fleet.place(s, Request(req.cpus, req.memory_bytes, req.driver,
                                                     host=req.host))
                inst = self._row(req, run, target, now)
                s.add(inst)
                spec = inst.wire_spec()
            log.info("creating %s on %s", req.name, target)
            try:
                report = await self.agents.call(target, rpc.CREATE,
                                                rpc.CreateArgs(spec=spec, fresh=True))
            except HostUnavailable as exc:
                self._after(req.name, State.FAILED, None)
                raise reword(exc, f"instance '{req.name}' may be half-created on {target}",
                             f"it is recorded as failed; 'corral rm {req.name}' cleans up "
                             "once the host answers") from exc
            except CorralError as exc:
                self._forget(req.name)
                raise reword(exc, f"host {target} could not create '{req.name}'",
                             exc.hint or "nothing was kept; fix the request and try again"
                             ) from exc
            self._after(req.name, State.CREATED, report)
            if req.start:
                await self._start(req.name, target, after_create=True)
        return self.get(req.name)

    async def create_many(self, reqs: Sequence[CreateInstance]) -> builtins.list[Created]:
        """Create (and start) many instances, each as :meth:`create` would, with what they
        share done once: one snapshot of the fleet and one transaction place up to
        :data:`BATCH_CHUNK` of them (each placement seeing the ones before it:
        :class:`Placer`), the agents are asked :data:`BATCH_PARALLEL` at a time, and their
        answers are recorded a chunk to a transaction. Each
        instance ends as a single create would (running, created, failed, or not kept), and
        its outcome says which, with the error if any; one instance's failure does not stop
        the others. The same name twice is refused before anything is done."""
        names = [r.name for r in reqs]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidRequest(f"the batch names {', '.join(twice)} more than once",
                                 hint="give every instance of a batch its own name")
        out: dict[str, Created] = {}

        def failed(name: str, exc: CorralError) -> None:
            out[name] = Created(name, None, exc)
            if self.on_error is not None:
                self.on_error(name, "create", exc)

        with contextlib.ExitStack() as held:
            todo: list[CreateInstance] = []
            for req in reqs:
                try:
                    held.enter_context(self.fleet.locks.holding(
                        f"verb:create:{uuid.uuid4().hex[:8]}",
                        LockSet.of([locks.instance(req.name)]), "'corral create'"))
                    if req.image is not None:
                        self._check_image(req.image)
                    todo.append(req)
                except CorralError as exc:
                    failed(req.name, exc)
            runs = await asyncio.to_thread(lambda: [self._resolve(r) for r in todo])
            placed: list[tuple[CreateInstance, str, WireSpec]] = []
            now = self.fleet.clock()
            pairs = list(zip(todo, runs, strict=True))
            for k in range(0, len(pairs), BATCH_CHUNK):  # the loop answers heartbeats between
                if k:
                    await asyncio.sleep(0)
                with self.fleet.sessions.begin() as s:
                    chunk = pairs[k:k + BATCH_CHUNK]
                    taken = set(s.scalars(select(Instance.name).where(
                        Instance.name.in_([r.name for r, _ in chunk]))))
                    placer = Placer(self.fleet.snapshot(s))  # with the chunks before it
                    for req, run in chunk:
                        if req.name in taken:
                            failed(req.name, Conflict(
                                f"an instance named '{req.name}' already exists",
                                hint="pick another name, or remove it first ('corral rm')"))
                            continue
                        try:
                            target = placer.place(Request(req.cpus, req.memory_bytes,
                                                          req.driver, host=req.host))
                        except CorralError as exc:
                            failed(req.name, exc)
                            continue
                        inst = self._row(req, run, target, now)
                        s.add(inst)
                        placed.append((req, target, inst.wire_spec()))
            gate = asyncio.Semaphore(BATCH_PARALLEL)

            async def one(req: CreateInstance, target: str, spec: WireSpec
                          ) -> tuple[str, Steps]:
                async with gate:
                    return req.name, await self._ask(req, target, spec, failed)

            moves = await asyncio.gather(*(one(*p) for p in placed))
            for k in range(0, len(moves), BATCH_CHUNK):
                await asyncio.sleep(0)
                with self.fleet.sessions.begin() as s:
                    for name, steps in moves[k:k + BATCH_CHUNK]:
                        row = s.get(Instance, name)
                        if row is None:
                            continue
                        if not steps:  # refused by its agent: nothing was made, nothing kept
                            s.delete(row)
                        for state, report in steps:
                            self.fleet.move_in(row, state, report=report)
            for k in range(0, len(moves), BATCH_CHUNK):
                await asyncio.sleep(0)
                with self.fleet.sessions() as s:
                    for made in s.scalars(select(Instance).where(
                            Instance.name.in_([n for n, _ in moves[k:k + BATCH_CHUNK]]))):
                        s.expunge(made)
                        earlier = out.get(made.name)
                        out[made.name] = Created(made.name, made,
                                                 earlier.error if earlier is not None else None)
        return [out.get(n) or Created(n, None, CorralError("lost track of it")) for n in names]

    async def _ask(self, req: CreateInstance, target: str, spec: WireSpec,
                   failed: Callable[[str, CorralError], None]) -> Steps:
        """A batch's create (and start) of one instance on its host: the moves to record,
        as :meth:`create` records them one by one (empty: nothing was made)."""
        name = req.name
        try:
            report = await self.agents.call(target, rpc.CREATE,
                                            rpc.CreateArgs(spec=spec, fresh=True))
        except HostUnavailable as exc:
            failed(name, reword(exc, f"instance '{name}' may be half-created on {target}",
                                f"it is recorded as failed; 'corral rm {name}' cleans up "
                                "once the host answers"))
            return [(State.FAILED, None)]
        except CorralError as exc:
            failed(name, reword(exc, f"host {target} could not create '{name}'",
                                exc.hint or "nothing was kept; fix the request and try again"))
            return []
        steps: Steps = [(State.CREATED, report)]
        if req.start:
            try:
                started = await self.agents.call(target, rpc.START,
                                                 rpc.StartArgs(name=name, epoch=spec.epoch))
                steps.append((State.RUNNING, started))
            except CorralError as exc:
                failed(name, reword(exc, f"instance '{name}' was created on {target} but "
                                         "did not start",
                                    f"it is recorded as failed; fix the cause, then 'corral "
                                    f"start {name}' or 'corral rm {name}'"))
                steps.append((State.FAILED, None))
        return steps

    @staticmethod
    def _row(req: CreateInstance, run: oci_config.Resolved, target: str, now: float
             ) -> Instance:
        return Instance(
            name=req.name, host=target, driver=req.driver, command=run.command,
            rootfs=req.rootfs, image=req.image, env=run.env, tail=dict(req.tail),
            cpus=req.cpus, vip=req.vip, image_config=run.process,
            restart_policy=(req.restart.model_dump() if req.restart.mode != "no"
                            else None),
            check_spec=req.check.model_dump() if req.check is not None else None,
            memory_bytes=req.memory_bytes, epoch=1, created_at=now, updated_at=now,
            desired_state=(State.RUNNING if req.start else State.CREATED).value,
            state=State.PENDING.value,
        )

    def _resolve(self, req: CreateInstance) -> oci_config.Resolved:
        """The process to run: the request laid over the image's config (when the image has
        one), argv, env and user resolved here once, so agents run what they are given."""
        config, read = None, None
        store = self.image_store
        if req.image is not None and store is not None:
            manifest = store.manifest(req.image)
            config = manifest.meta.get("config")
            read = functools.partial(oci_config.read_tree_file, manifest, store.packs)
        return oci_config.resolve(config if isinstance(config, dict) else None,
                                  command=list(req.command), entrypoint=req.entrypoint,
                                  env=dict(req.env), driver=req.driver, read_file=read)

    def _check_image(self, image: str) -> None:
        """Refuse before placing: an agent could only fail later, and less clearly."""
        if self.image_exists is None or not self.image_exists(image):
            raise NotFound(f"no image named '{image}'",
                           hint="see 'corral image ls', or 'corral image import NAME PATH'")

    def _forget(self, name: str) -> None:
        with self.fleet.sessions.begin() as s:
            inst = s.get(Instance, name)
            if inst is not None:
                s.delete(inst)

    async def _start(self, name: str, host: str, *, after_create: bool = False) -> None:
        with self.fleet.sessions.begin() as s:
            inst = self._get(s, name)
            if not after_create:
                self.fleet.move_in(inst, epoch=inst.epoch + 1)
            epoch = inst.epoch
        try:
            report = await self.agents.call(host, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        except CorralError as exc:
            if not after_create:
                raise
            self._after(name, State.FAILED, None)
            raise reword(exc, f"instance '{name}' was created on {host} but did not start",
                         f"it is recorded as failed; fix the cause, then 'corral start {name}'"
                         f" or 'corral rm {name}'") from exc
        self._after(name, State.RUNNING, report)

    # --- verbs ------------------------------------------------------------------------------

    async def act(self, name: str, verb: Verb, body: ActionRequest | None = None) -> Instance:
        body = body or ActionRequest()
        await self.fleet.wait_free(name)
        with self._busy(name, verb.value):
            with self.fleet.sessions.begin() as s:
                inst = self._get(s, name)
                current = State(inst.state)
                target = check_verb(name, current, verb)
                host = self._host_up(s, inst)
                self.fleet.move_in(inst, desired_state=DESIRED[verb].value)
            if verb is Verb.START or (verb is Verb.RESTART and current not in ALIVE):
                await self._start(name, host)
            elif verb is Verb.RESTART:
                await self._stop(name, host, body.timeout)
                await self._start(name, host)
            elif verb is Verb.STOP:
                await self._stop(name, host, body.timeout)
            elif verb is Verb.KILL:
                sig = body.signal or 9
                report = await self.agents.call(host, rpc.KILL, rpc.KillArgs(name=name, signal=sig))
                self._after(name, target, report)
            else:
                call = rpc.FREEZE if verb is Verb.FREEZE else rpc.THAW
                report = await self.agents.call(host, call, rpc.NameArgs(name=name))
                self._after(name, target, report)
        return self.get(name)

    async def _stop(self, name: str, host: str, timeout: float | None) -> None:
        grace = timeout if timeout is not None else self.settings.stop_timeout
        report = await self.agents.call(host, rpc.STOP, rpc.StopArgs(name=name, timeout=grace))
        self._after(name, State.STOPPED, report)

    # --- delete -----------------------------------------------------------------------------

    async def delete(self, name: str, force: bool = False) -> None:
        await self.fleet.wait_free(name)
        with self._busy(name, "delete"):
            with self.fleet.sessions.begin() as s:
                inst = self._get(s, name)
                state = State(inst.state)
                alive = state in ALIVE
                if not (alive and force):
                    try:
                        check_verb(name, state, Verb.DELETE)
                    except CorralError as exc:
                        if alive:
                            exc.hint += "; or remove it with force (stops it first)"
                        raise
                host_row = s.get(Host, inst.host) if inst.host else None
                host = inst.host or ""
                up = host_row is not None and host_row.state == "up"
                self.fleet.move_in(inst, desired_state=State.DELETED.value)
            if not up and state != State.SHELVED:  # a shelved one has no host to ask
                if not force:
                    raise HostUnavailable(
                        f"host {host} of instance '{name}' is down, so it cannot clean up",
                        hint=f"wait for the host, or 'corral rm --force {name}' to forget it "
                             f"(its files stay on {host})",
                    )
                log.warning("forgetting %s without its host %s (down)", name, host)
            for hook in self.before_delete:
                await hook(name)
            if up:
                if alive:
                    await self._stop(name, host, None)
                try:
                    await self.agents.call(host, rpc.DELETE, rpc.DeleteArgs(name=name))
                except NotFound:
                    log.info("agent on %s did not know %s; removing the record", host, name)
            self._forget(name)
