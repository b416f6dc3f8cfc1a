"""The master process: the HTTP API (and dashboard) and the worker tunnels.

Contract
--------
``Master(config)``; ``await start()`` resolves the model (folder, hub id or the embedded
default), loads its tokenizer and config, and serves the API on ``config.host:config.port``
(``port`` 0 picks a free one; ``master.port`` tells).

Two ways in for workers:

* a paired group (``config.data_dir`` set): the group port (:class:`~master_core.group_port.
  GroupPort`, mutual TLS, members pinned by certificate) takes pairings and tunnels; workers
  receive the weights of their range from this process (:class:`~master_core.weight_source.
  WeightSource`).  The API port gains ``/admin/*`` (code, members, remove), which needs the
  per-launch admin token written to ``data_dir/admin.json`` (mode 0600) for the CLI.  The
  group is announced on the LAN by mDNS.
* otherwise, plain unauthenticated ``ws://HOST:PORT/v1/tunnel`` on the API port, only when
  that port is bound to loopback (tests, the demo), with a loud warning.

A tunnel's first frame must be a ``Hello`` within ``HELLO_TIMEOUT`` seconds, or it is closed.
``await stop()`` closes tunnels and listeners.  ``listening_info()`` is the body of the
supervised ``listening`` event (see :mod:`worker_core.control`).  ``run_master(config,
control=, events=)`` serves until cancelled or, supervised, until a control command
(``stop`` or ``finish``), then stops and returns 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import socket
from pathlib import Path

from aiohttp import WSMsgType, web

from worker_core import model_source
from worker_core.address import format_address, is_loopback
from worker_core.control import Control, Events
from worker_core.draft_model import DraftModel
from worker_core.pieces import Joiner
from worker_core.unsent import keep_unsent_low
from worker_core.wire import CloseCode, Hello, ProtocolError, frame_bound

from .api import Api, error_middleware
from .config import MasterConfig
from .dashboard import Dashboard
from .draft_offer import offer_draft
from .engine import Engine
from .errors import ApiError
from .group import Group
from .link import WorkerLink
from .member_path import member_path
from .metering import on_bytes
from .metrics import Metrics
from .model_dims import ModelDims
from .security import GuardPolicy, guard_middleware

log = logging.getLogger("molink.master")

HELLO_TIMEOUT = 10.0  # seconds
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_tokenizer(folder: Path):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def eos_token_ids(folder: Path, tokenizer) -> set[int]:
    """Every token id that ends generation: tokenizer EOS plus generation_config's list."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(folder)
        eos = gen.eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    return ids


class Master:
    def __init__(self, config: MasterConfig) -> None:
        config.validate()
        self.config = config
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self._engine_task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self._tunnels: set[WorkerLink] = set()  # every worker tunnel open now (dropped links too)

    async def start(self) -> None:
        cfg = self.config
        folder = await asyncio.to_thread(model_source.resolve, cfg.model)
        self.folder = folder
        self.model_id = model_source.display_name(cfg.model, folder)
        self.dims = await asyncio.to_thread(ModelDims.load, folder)  # parsed once, passed everywhere
        self.tokenizer = await asyncio.to_thread(load_tokenizer, folder)
        self.drafter: DraftModel | None = None
        if cfg.draft_model:  # checked against the served tokenizer before its weights are read
            from worker_core.draft_model import load_draft_model

            self.drafter = await asyncio.to_thread(
                load_draft_model, cfg.draft_model, self.tokenizer, self.dims.vocab_size, cfg.max_running
            )
        # workers resolve the same source themselves: the default model from their own package,
        # a folder by path (same machine or shared disk), a hub id from the hub.
        ref = cfg.model if cfg.model == model_source.DEFAULT else str(folder)
        self.group = Group(cfg, ref, self.dims)
        if self.drafter is not None and cfg.data_dir is None:  # local: the last stage reads the folder
            self.group.draft = await asyncio.to_thread(offer_draft, Path(cfg.draft_model).expanduser(), None)
        self.engine = Engine(cfg, self.group, self.tokenizer, eos_token_ids(folder, self.tokenizer), self.drafter)
        self.group.running_requests = lambda: set(self.engine.running)  # a finishing worker waits for these
        self.group.replay_cost = self.engine.replay_seconds  # a newcomer's re-plan waits until it is cheap
        self.max_frame = frame_bound(cfg.max_batch_tokens, self.dims.hidden_size, self.dims.vocab_size)
        self.api = Api(self.engine, self.model_id)
        self.dashboard = Dashboard(self.engine, self.model_id, ASSETS / "dashboard")
        self.metrics = Metrics(self.engine)
        self.dashboard_token = secrets.token_urlsafe(24)  # new every launch

        self.admin_token = secrets.token_urlsafe(24)  # new every launch
        self.group_port = None
        self.reach = None  # master_core.reach.Reach of a paired group: its candidates and port mapping
        self.bridge = None
        self._advertiser = None
        self._policy: GuardPolicy | None = None
        app = web.Application(
            client_max_size=cfg.max_body_bytes, middlewares=[error_middleware, guard_middleware(lambda: self._policy)]
        )
        app.add_routes([*self.api.routes(), *self.dashboard.routes(), web.get("/metrics", self.metrics.handler)])
        if cfg.data_dir is not None:
            await self._start_group(Path(cfg.data_dir), folder)
            app.add_routes(self._admin_routes())
        elif is_loopback(cfg.host):
            app.add_routes([web.get("/v1/tunnel", self._plain_tunnel)])
            log.warning(
                "UNAUTHENTICATED plain worker tunnels on %s: any local process can join; for tests and the demo only",
                cfg.host,
            )
        else:
            log.warning(
                "no worker tunnels: %s is not loopback and this master has no paired group (molink group create)",
                cfg.host,
            )
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port (0 picks one); the runner has this one site
        # the guard needs the real port, known only now (port 0 picks one)
        self._policy = GuardPolicy.build(
            cfg.host, self.port, cfg.allowed_hosts, cfg.api_key, self.dashboard_token, self.admin_token
        )
        if cfg.data_dir is not None:
            self._write_admin_file(Path(cfg.data_dir))
        self._engine_task = asyncio.create_task(self.engine.run())
        self.dashboard.start()
        log.info(
            "master for %s listening on http://%s:%d (%d layers; waiting for %d worker(s))",
            self.model_id,
            cfg.host,
            self.port,
            self.dims.num_layers,
            cfg.min_workers,
        )
        log.info("dashboard: %s", self.dashboard_url)

    @property
    def dashboard_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.port}/dashboard?token={self.dashboard_token}"

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def listening_info(self) -> dict:
        """Where this master listens, as the supervised ``listening`` event reports it."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        paired = self.config.data_dir is not None
        return {
            "api": f"{host}:{self.port}",
            "dashboard": self.dashboard_url,
            "group_port": self.group_port.port if self.group_port is not None else None,
            "group": self.members.group if paired else None,
            "model": self.model_id,
            "admin_token": self.admin_token if paired else None,
        }

    # ------------------------------------------------------------------ paired group
    async def _start_group(self, data_dir: Path, folder: Path) -> None:
        from worker_core.identity import load_or_create

        from .announce import Advertiser
        from .group_port import GroupPort
        from .invitations import Invitations
        from .members import Members
        from .weight_source import WeightSource

        cfg = self.config
        identity = await asyncio.to_thread(load_or_create, data_dir / "identity", "molink-master")
        self.members = Members.open(data_dir, identity, cfg.group_name or socket.gethostname())
        self.invitations = Invitations()
        hub = model_source.hub_ref(cfg.model, folder)
        self.group.weights = await asyncio.to_thread(WeightSource, folder, data_dir / "hashes.json", hub)
        if cfg.draft_model:  # the last stage gets the draft model's tensors from us too
            draft = Path(cfg.draft_model).expanduser()  # its hashes kept apart: each source rewrites its file whole
            self.group.draft_weights = await asyncio.to_thread(WeightSource, draft, data_dir / "draft-hashes.json")
            self.group.draft = await asyncio.to_thread(offer_draft, draft, self.group.draft_weights)
        from .reach import Reach

        self.group_port = GroupPort(
            identity,
            self.members,
            self.invitations,
            self._accept_tunnel,
            candidates=lambda: [c.to_json() for c in self.reach.candidates()] if self.reach else [],
        )
        await self.group_port.start(cfg.group_host, cfg.group_port)
        self.reach = Reach(self.group_port.port, cfg.group_host, cfg.port_mapping, relay=cfg.relay)
        await self.reach.start()
        log.info("%s", self.reach.summary())
        if cfg.relay:
            from worker_core.bridge_host import BridgeHost

            self.group_port.relay = cfg.relay
            reach = self.reach

            def checked(port: int, ok: bool, why: str) -> None:
                reach.checked(port, ok, why)
                log.info("%s", reach.summary())

            self.bridge = BridgeHost(
                cfg.relay,
                identity,
                self.invitations.nameplates,
                self.group_port.accept_bridged,
                mapped_port=reach.mapped_port,
                on_checked=checked,
            )
            await self.bridge.start()
        self._advertiser = Advertiser(self.group_port.port, self.members.group, cfg.group_host)
        await self._advertiser.start()
        log.info(
            "group %r: pairing and mutual-TLS tunnels on %s (%d member(s))",
            self.members.group,
            format_address(cfg.group_host, self.group_port.port),
            len(self.members.members()),
        )

    def _write_admin_file(self, data_dir: Path) -> None:
        path = data_dir / "admin.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "api": f"127.0.0.1:{self.port}"
                    if self.config.host in ("0.0.0.0", "::")
                    else f"{self.config.host}:{self.port}",
                    "token": self.admin_token,
                    "pid": os.getpid(),
                },
                f,
            )
        os.replace(tmp, path)

    def new_code(self) -> str:
        import time

        code = self.invitations.issue(time.monotonic())
        if self.bridge is not None:
            self.bridge.changed()  # the relay learns the nameplate: the code alone finds this group
        return code

    def remove_member(self, name: str) -> bool:
        if not self.members.remove(name):
            return False
        for link in list(self.group.links):
            if link.member == name:
                link.close_with("removed from the group")
        return True

    def _admin_routes(self) -> list[web.RouteDef]:
        async def code(request: web.Request) -> web.Response:
            from .invitations import TTL, TooManyCodes

            try:
                reach = self.reach
                return web.json_response(
                    {
                        "code": self.new_code(),
                        "expires_in": int(TTL),
                        "group": self.members.group,
                        "candidates": [c.to_text() for c in reach.candidates()] if reach else [],
                        "reach": reach.summary() if reach else "",
                    }
                )
            except TooManyCodes as e:
                return ApiError(429, str(e), "rate_limit_error").response()

        async def members(request: web.Request) -> web.Response:
            online = {link.member for link in self.group.live_links()}
            announced = {d["name"]: d for d in self.group.describe()}
            rows = [
                {
                    "name": m.name,
                    "fingerprint": m.fingerprint,
                    "joined": m.joined,
                    "connected": m.name in online,
                    "worker": announced.get(m.name),
                }
                for m in self.members.members()
            ]
            return web.json_response({"group": self.members.group, "members": rows})

        async def remove(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if not self.remove_member(name):
                return ApiError(404, f"no member named {name!r}", code="member_not_found").response()
            return web.json_response({"removed": name})

        return [
            web.post("/admin/code", code),
            web.get("/admin/members", members),
            web.delete("/admin/members/{name}", remove),
        ]

    # ------------------------------------------------------------------ tunnels
    async def _plain_tunnel(self, request: web.Request) -> web.StreamResponse:
        return await self._accept_tunnel(request, None)

    async def _first_message(self, ws: web.WebSocketResponse) -> object:
        """A tunnel's first message (its frame may come in pieces, :mod:`worker_core.pieces`)."""
        joiner = Joiner()
        while True:
            frame = await ws.receive()
            if frame.type != WSMsgType.BINARY:
                raise ProtocolError(f"expected Hello, got a {frame.type.name} frame")
            if (msg := joiner.feed(frame.data, self.max_frame)) is not None:
                return msg

    async def _accept_tunnel(self, request: web.Request, member: str | None) -> web.StreamResponse:
        # liveness is the link's own (pings it sends, pings it answers: master_core.link), not aiohttp's
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, compress=False, heartbeat=None, autoping=False)
        await ws.prepare(request)
        keep_unsent_low(ws)  # a decode step goes between a longer frame's pieces (link.py): not behind the kernel's
        link: WorkerLink | None = None
        # heard while a large frame is still arriving (liveness counts bytes, not complete frames)
        on_bytes(request, lambda: link.heard_bytes() if link is not None else None)
        peer = self.group_port.peer(request) if self.group_port is not None else request.remote or "?"
        try:
            hello = await asyncio.wait_for(self._first_message(ws), HELLO_TIMEOUT)
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected Hello, got {type(hello).__name__}")
        except (ProtocolError, asyncio.TimeoutError) as e:
            log.error("tunnel from %s refused: %s", peer, e or "no Hello in time")
            await ws.close(code=CloseCode.PROTOCOL_ERROR, message=b"protocol error")
            return ws
        if member is not None:
            hello = dataclasses.replace(hello, name=member)  # the group knows it by its member name
            if self.reach is not None and self.reach.member_came(hello.dialled, member, member_path(peer), peer):
                log.info("%s", self.reach.summary())
        link = WorkerLink(ws, hello, peer, self.max_frame, self.group.weights, self.group.draft_weights)
        link.member = member
        if member is not None:  # paired: its certificate pins it on direct hops too
            known = next((m for m in self.members.members() if m.name == member), None)
            link.cert = known.cert if known is not None else ""
        self.group.add(link)
        self._tunnels.add(link)
        try:
            await link.run_reader()
        finally:
            self._tunnels.discard(link)
            link.close_with(link.gone_reason or "tunnel closed")
            self.group.remove(link)
            await link.wait_closed()
        return ws

    async def wait_serving(self, timeout: float) -> None:
        await asyncio.wait_for(self.group.wait_serving(), timeout)

    async def stop(self) -> None:
        """Close tunnels and listeners; every task this master started is awaited."""
        await self.group.stop()
        if self._engine_task:
            self._engine_task.cancel()
            await asyncio.gather(self._engine_task, return_exceptions=True)
        # tunnels first: a listener's shutdown would otherwise wait for their handlers (aiohttp's
        # shutdown timeout) while the workers, told nothing, keep a silent tunnel
        links = list(self._tunnels)  # members, and links dropped as hung whose tunnels linger
        for link in links:
            link.close_with("the master stopped")
        await self.dashboard.stop()
        if self.bridge is not None:
            await self.bridge.stop()
        if self._advertiser is not None:
            await self._advertiser.stop()
        if self.group_port is not None:
            await self.group_port.stop()
        if self.reach is not None:
            await self.reach.stop()  # the router forgets the mapping
        for link in links:
            await link.wait_closed()
        if self._runner:
            await self._runner.cleanup()
        drafter = getattr(self, "drafter", None)  # not there when start() failed early
        if drafter is not None:
            drafter.close()


async def run_master(
    config: MasterConfig,
    started: asyncio.Event | None = None,
    control: Control | None = None,
    events: Events | None = None,
) -> int:
    events = events or Events()
    master = Master(config)
    await master.start()
    events.emit("listening", **master.listening_info())
    if started is not None:
        started.set()
    try:
        await serve_until_stopped(control)
    finally:
        events.emit("stopping")
        await master.stop()
    return 0


async def serve_until_stopped(control: Control | None) -> None:
    """Wait until cancelled or, supervised, until any control command (a master treats
    ``finish`` as ``stop``)."""
    if control is None:
        await asyncio.Event().wait()
        return
    cmd = await control.next()
    log.info("control: %s: stopping", cmd.value)
