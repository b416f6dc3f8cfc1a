"""The app's logic: this PC's worker and master children, the group actions, the state snapshot.

Contract
--------
``Controller(paths, settings, ...)`` owns the settings, a worker :class:`Supervisor` (``molink
worker --supervised`` for the group this PC joined) and a master :class:`Supervisor`
(``molink group create --supervised`` when this PC hosts a group).  Every user command is a
method (``set_sharing``, ``pause``, ``resume``, ``finish``, ``keep_sharing``, ``create_group``,
``stop_group``, ``request_code``, ``accept_join``, ``quit``); every change of what the tray
shows emits ``changed`` and ``snapshot()`` returns the new :class:`TrayState`.

Leaving is graceful: turning sharing off, pausing and quitting send ``stop`` through the
worker's control channel (the worker tells the master, which re-plans and replays; see
:mod:`worker_core.control`); finishing sends ``finish``.  The sharing state only moves through
:func:`app.desktop.state.move`.

The local master is watched over HTTP (``/health`` every ``POLL_SECONDS``, ``/admin/*`` with
the admin token it reported): members online, serving, tokens/s.  All network calls are
asynchronous (``QNetworkAccessManager``) with a timeout; nothing blocks the Qt loop.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import time
from collections.abc import Callable

from PySide6.QtCore import QByteArray, QObject, QTimer, QUrl, Signal
from PySide6.QtNetwork import QNetworkAccessManager, QNetworkReply, QNetworkRequest

from app.group import links
from app.group.client import invitation_link
from app.proc.spawn import engine_command
from worker_core.control import FINISH_TIMEOUT, LEAVE_TIMEOUT

from .settings import Paths, Settings, save
from .state import Sharing, TrayState, member_line, move
from .supervisor import Supervisor
from .system import autopause

log = logging.getLogger("molink.app")

POLL_SECONDS = 2.0  # how often the local master's /health is read
HTTP_TIMEOUT_MS = 5000  # every request to the local master
PAUSE_CHECK_MS = 5000  # how often a timed pause and the auto-pause policy are looked at
STOP_GRACE = 30.0  # seconds a child has to stop after being asked
# seconds a finishing worker may take: the master's bound for its requests, then its leave
FINISH_GRACE = FINISH_TIMEOUT + LEAVE_TIMEOUT
PAUSE_HOUR = 3600.0


def gpu_summary() -> str:
    """GPU name and memory from NVML, or the CPU and RAM; never raises, never imports torch."""
    try:
        from worker_core.gpus import list_gpus

        gpus = list_gpus()
    except Exception:  # no NVML, a broken driver: the worker decides the device anyway
        gpus = []
    if gpus:
        g = gpus[0]
        more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
        return f"{g.name}, {g.total_memory / 2**30:.1f} GB{more}"
    try:
        import psutil

        return f"No NVIDIA GPU: shares the CPU, {psutil.virtual_memory().total / 2**30:.0f} GB RAM"
    except Exception:
        return "No NVIDIA GPU: shares the CPU"


def engine_ready_default() -> bool:
    """Whether engine children can start: from source (or an installed package) the engine is this
    interpreter; an installed (frozen) app first makes its per-user engine runtime ready, showing
    the progress dialog while it is built (:func:`app.desktop.runtime_dialog.ensure_runtime`)."""
    if not getattr(sys, "frozen", False):
        return True
    from .runtime_dialog import ensure_runtime

    return ensure_runtime(None)


class Controller(QObject):
    changed = Signal()
    notify = Signal(str, str)  # title, message: for changes the user did not make
    code_ready = Signal(dict)  # {"code", "expires_in", "link", "group", "group_port"}
    code_failed = Signal(str)
    master_ready = Signal(dict)  # the master's "listening" event
    relay_ready = Signal(int)  # the port the relay this PC runs listens on
    master_failed = Signal(str)  # one sentence (create-group dialog)
    quit_ready = Signal()

    def __init__(
        self,
        paths: Paths,
        settings: Settings,
        argv: Callable[..., list[str]] = engine_command,
        gpu: str | None = None,
        probe_load: Callable[[set[int]], autopause.GpuLoad | None] | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.paths = paths
        self.settings = settings
        self._argv = argv
        self._gpu = gpu if gpu is not None else gpu_summary()
        self._probe_load = probe_load or (lambda pids: autopause.probe_gpu_load(pids))
        # asked before any engine child starts: an installed app builds its engine runtime
        # (a dialog) here; from source the engine is this interpreter
        self.engine_ready: Callable[[], bool] = engine_ready_default
        self._asking_engine = False  # engine_ready() runs (its dialog's event loop still runs timers)
        self.sharing = Sharing.OFF
        self._after_stop = Sharing.OFF  # where a stopping worker lands: OFF or PAUSED
        self.paused_until: float | None = None
        self._auto_paused = False
        self.layers: tuple[int, int] | None = None
        self.worker_path: str | None = None  # how the worker's tunnel reaches the master (its "connected" event)
        self.num_layers: int | None = None
        self.worker_tps: float | None = None
        self.problem: str | None = None
        self.last_log: list[str] = []
        self.worker: Supervisor | None = None
        self.master: Supervisor | None = None
        self.relay: Supervisor | None = None  # this PC's `molink relay`, while the user offers one
        self.relay_port: int | None = None  # where it listens, once it said so
        self.relay_outside: str | None = None  # HOST:PORT its router maps to it, if it does
        self.master_info: dict | None = None  # the master's "listening" event
        self.health: dict | None = None
        self.members: dict | None = None
        self.master_problem: str | None = None
        self._tokens_seen: tuple[float, int] | None = None
        self.group_tps: float | None = None
        self._quitting = False
        self._net = QNetworkAccessManager(self)
        self._poll = QTimer(self)
        self._poll.timeout.connect(self._poll_master)
        self._tick = QTimer(self)
        self._tick.timeout.connect(self._on_tick)
        self._tick.start(PAUSE_CHECK_MS)
        self.policy = autopause.AutoPause()
        if settings.paused_until is not None and self.joined() is not None:
            self.sharing, self.paused_until = Sharing.PAUSED, settings.paused_until

    # ------------------------------------------------------------------ snapshot
    def joined(self):  # -> JoinedGroup | None
        from worker_core.pairing import JoinedGroup, PairingError

        try:
            return JoinedGroup.load(self.paths.worker_dir)
        except (PairingError, OSError, ValueError):
            return None

    def hosting(self) -> bool:
        return self.master is not None and self.master.running()

    def snapshot(self) -> TrayState:
        joined = self.joined()
        h = self.health or {}
        workers = h.get("workers") or []
        online = members_total = None
        if self.hosting():
            online = sum(1 for w in workers if w.get("state") == "ready")
            if self.members is not None:
                members_total = len(self.members.get("members") or [])
        api = self.master_info.get("api") if self.master_info else None
        return TrayState(
            sharing=self.sharing,
            gpu=self._gpu,
            paused_until=self.paused_until,
            joined_group=joined.group if joined else None,
            hosting=self.hosting(),
            hosted_group=(self.master_info or {}).get("group") if self.hosting() else None,
            master_ready=self.master_info is not None and self.hosting(),
            group_serving=h.get("status") == "ok",
            members_online=online,
            members_total=members_total,
            members=tuple(member_line(w) for w in workers) if self.hosting() else (),
            layers=self.layers,
            path=self.worker_path,
            num_layers=self.num_layers,
            tokens_per_s=self.group_tps if self.hosting() else self.worker_tps,
            problem=self.problem if self.sharing is Sharing.PROBLEM else self.master_problem,
            pause_warning=self.settings.auto_pause and self.policy.warning,
            api_address=api,
            relaying=self.relay is not None,
            relay_port=self.relay_port,
            relay_outside=self.relay_outside,
            last_log=tuple(self.last_log),
        )

    def _set(self, new: Sharing) -> None:
        self.sharing = move(self.sharing, new)
        self.changed.emit()

    # ------------------------------------------------------------------ sharing
    def worker_argv(self) -> list[str]:
        args = ["worker", "--data-dir", str(self.paths.worker_dir), "--device", self.settings.device, "--supervised"]
        if self.settings.memory_limit_gb:
            args += ["--memory-limit", f"{self.settings.memory_limit_gb:g}"]
        if sys.platform == "win32":  # a listening worker would raise the firewall prompt: dial out only
            args.append("--dial-only")
        return self._argv(*args)

    def set_sharing(self, on: bool) -> None:
        self.policy.reset()  # a choice of the user's ends any automatic pause episode
        if on:
            self._start_worker()
        else:
            self._stop_worker(Sharing.OFF)

    def _start_worker(self) -> None:
        if self.joined() is None:
            self.problem = "join or create a group first"
            self.changed.emit()
            return
        if self.sharing not in (Sharing.OFF, Sharing.PAUSED, Sharing.PROBLEM) or self._asking_engine:
            return
        if not self._ask_engine():
            self.problem = "the engine runtime is not installed yet"
            if self.sharing is Sharing.PAUSED:  # a pause that ended: not sharing, and no dialog at every tick
                self.paused_until = None
                self._auto_paused = False
                self._land(Sharing.OFF)
            self.changed.emit()
            return
        if self.sharing not in (Sharing.OFF, Sharing.PAUSED, Sharing.PROBLEM):
            return  # the user changed it while the runtime was being built
        self.paused_until = None
        self._auto_paused = False
        self.problem = None
        self.layers = self.worker_path = None
        self.worker_tps = None
        self.remember(paused_until=None, share_on_start=True)
        if self.worker is None:
            self.worker = Supervisor("worker", self.worker_argv(), self.paths.logs_dir / "worker.log", parent=self)
            self.worker.engine_event.connect(self._worker_event)
            self.worker.crashed.connect(self._worker_crashed)
            self.worker.stopped.connect(self._worker_stopped)
        else:
            self.worker.argv = self.worker_argv()  # settings may have changed
        self._set(Sharing.STARTING)
        self.worker.start()

    def _ask_engine(self) -> bool:
        """``engine_ready()``, never two at once (a timer or a menu could ask again while its dialog is open)."""
        self._asking_engine = True
        try:
            return self.engine_ready()
        finally:
            self._asking_engine = False

    def _stop_worker(self, after: Sharing, cmd: str = "stop") -> None:
        """Leave the group gracefully, landing in ``after`` (OFF or PAUSED)."""
        self._after_stop = after
        if self.worker is None or not self.worker.running():
            if self.worker is not None:
                self.worker.stop()  # cancels a scheduled restart
            if self.sharing is not after:
                self._land(after)
            return
        if cmd == "finish":
            self._set(Sharing.FINISHING)
            self.worker.stop("finish", FINISH_GRACE)
        else:
            self._set(Sharing.STOPPING)
            self.worker.stop("stop", STOP_GRACE)

    def _land(self, after: Sharing) -> None:
        self.sharing = move(self.sharing, after)
        self.layers = self.worker_path = None
        self.worker_tps = None
        paused = after is Sharing.PAUSED
        self.remember(share_on_start=paused, paused_until=self.paused_until if paused else None)
        self.changed.emit()

    def pause(self, seconds: float | None, auto: bool = False) -> None:
        """Leave now and come back after ``seconds`` (None: until the user resumes)."""
        if not auto:
            self.policy.reset()
        self.paused_until = math.inf if seconds is None else time.time() + seconds
        self._stop_worker(Sharing.PAUSED)

    def resume(self) -> None:
        self.policy.reset()
        self._start_worker()

    def finish(self) -> None:
        self.policy.reset()
        self._stop_worker(Sharing.OFF, cmd="finish")

    def keep_sharing(self) -> None:
        self.policy.keep_sharing(time.monotonic())
        self.changed.emit()

    def _worker_event(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "serving":
            layers = ev.get("layers")
            if isinstance(layers, list) and len(layers) == 2:
                self.layers = (int(layers[0]), int(layers[1]))
            self.num_layers = ev.get("num_layers") if isinstance(ev.get("num_layers"), int) else self.num_layers
            self.problem = None
            if self.sharing in (Sharing.STARTING, Sharing.PROBLEM):
                self._set(Sharing.SHARING)
            else:
                self.changed.emit()
        elif kind == "stats":
            tps = ev.get("tokens_per_s")
            self.worker_tps = float(tps) if isinstance(tps, (int, float)) else None
            self.changed.emit()
        elif kind in ("connected", "connecting"):
            path = ev.get("path")
            self.worker_path = str(path)[:120] if kind == "connected" and isinstance(path, str) else None
            if self.sharing is Sharing.PROBLEM:
                self.problem = None
                self._set(Sharing.STARTING)
        elif kind == "disconnected":
            self.layers = self.worker_path = None
            if self.sharing is Sharing.SHARING:
                self._set(Sharing.STARTING)
        elif kind == "error":
            self.problem = str(ev.get("message") or "the worker reported an error")[:300]
            if self.sharing in (Sharing.STARTING, Sharing.SHARING):
                self._set(Sharing.PROBLEM)
            self.notify.emit("MoLink: sharing has a problem", self.problem)

    def _worker_crashed(self, code: int, lines: list) -> None:
        self.last_log = [str(x) for x in lines][-10:]
        self.problem = f"the worker stopped unexpectedly (exit code {code}); restarting"
        self.layers = self.worker_path = None
        if self.sharing in (Sharing.STARTING, Sharing.SHARING):
            self._set(Sharing.PROBLEM)
        elif self.sharing in (Sharing.FINISHING, Sharing.STOPPING):  # it died while leaving: it has left
            if self.worker is not None:
                self.worker.stop()  # cancels the scheduled restart; its `stopped` may land the state first
            if self.sharing in (Sharing.FINISHING, Sharing.STOPPING):
                self._land(self._after_stop)
            self._maybe_quit()
            return
        self.notify.emit("MoLink: the worker stopped", self.problem)

    def _worker_stopped(self, code: int) -> None:
        if self.sharing in (Sharing.STOPPING, Sharing.FINISHING):
            self._land(self._after_stop)
        self._maybe_quit()

    def _on_tick(self) -> None:
        now = time.time()
        if self.sharing is Sharing.PAUSED and self.paused_until is not None and now >= self.paused_until:
            self.notify.emit("MoLink", "The pause is over: sharing again")
            self._start_worker()
            return
        if not self.settings.auto_pause:
            return
        manual_pause = self.sharing is Sharing.PAUSED and not self._auto_paused
        if manual_pause or self.sharing in (Sharing.OFF, Sharing.STOPPING, Sharing.FINISHING):
            return
        own = {p for p in (self.worker.pid() if self.worker else None,) if p}
        decision = self.policy.update(self._probe_load(own), time.monotonic())
        if decision is autopause.Decision.WARN:
            self.changed.emit()
            self.notify.emit(
                "MoLink will pause sharing in 60 s",
                "Another program is using the GPU heavily. Choose “Keep sharing” in the menu to stay.",
            )
        elif decision is autopause.Decision.PAUSE and self.sharing not in (Sharing.PAUSED,):
            self.notify.emit(
                "MoLink paused sharing", "Another program is using the GPU; sharing resumes when it is done."
            )
            self.pause(None, auto=True)
            self._auto_paused = True
        elif decision is autopause.Decision.RESUME and self.sharing is Sharing.PAUSED and self._auto_paused:
            self._start_worker()

    def remember(self, **changes: object) -> None:
        for k, v in changes.items():
            setattr(self.settings, k, v)
        try:
            save(self.paths, self.settings)
        except OSError as e:
            log.warning("cannot save settings: %s", e)

    # ------------------------------------------------------------------ hosting a group
    def create_group(self, model: str, name: str, port: int, relay: str = "") -> None:
        """Start ``molink group create`` on this PC (registered at ``relay``, HOST:PORT, when
        given); ``master_ready`` or ``master_failed`` follows."""
        if self.hosting():
            self.master_failed.emit("this PC already runs a group")
            return
        if self._asking_engine:
            self.master_failed.emit("the engine runtime is being installed; try again when it is ready")
            return
        if not self._ask_engine():
            self.master_failed.emit("the engine runtime is not installed yet")
            return
        self.remember(model=model, group_name=name, group_port=port, relay=relay)
        args = [
            "group",
            "create",
            "--model",
            model,
            "--host",
            self.settings.group_host,
            "--port",
            str(port),
            "--api-port",
            "0",
            "--data-dir",
            str(self.paths.master_dir),
            "--supervised",
        ]
        if name:
            args += ["--name", name]
        if relay:
            args += ["--relay", relay]
        self.master_info = None
        self.master_problem = None
        self.master = Supervisor(
            "master", self._argv(*args), self.paths.logs_dir / "master.log", restart=False, parent=self
        )
        self.master.engine_event.connect(self._master_event)
        self.master.crashed.connect(self._master_crashed)
        self.master.stopped.connect(self._master_stopped)
        self.master.start()
        self.changed.emit()

    # ------------------------------------------------------------------ a relay on this PC
    def set_relaying(self, on: bool) -> None:
        """Offer (or stop offering) this PC as a relay for groups that register at it: a
        supervised ``molink relay`` child on the address a hosted group would listen on
        (``settings.group_host``: every interface, unless set), port ``settings.relay_port``;
        restarted if it crashes; remembered for the next start."""
        if on and self.relay is None and (self._asking_engine or not self._ask_engine()):
            return  # `molink relay` runs from the engine runtime, which is not installed yet
        self.remember(run_relay=on)
        if on and self.relay is None:
            from worker_core.address import format_address, is_loopback

            host = self.settings.group_host if self.settings.group_host not in ("", "::") else "0.0.0.0"
            listen = format_address(host, self.settings.relay_port)
            args = ["relay", "--listen", listen, "--supervised"]
            if not is_loopback(self.settings.group_host):
                args.append("--map-port")  # a PC at home: its router forwards the relay's port
            self.relay = Supervisor("relay", self._argv(*args), self.paths.logs_dir / "relay.log", parent=self)
            self.relay.engine_event.connect(self._relay_event)
            self.relay.stopped.connect(self._relay_stopped)
            self.relay.start()
        elif not on and self.relay is not None:
            self.relay.stop("stop", STOP_GRACE)
        self.changed.emit()

    def _relay_event(self, ev: dict) -> None:
        if ev.get("event") == "listening" and isinstance(ev.get("port"), int):
            self.relay_port = ev["port"]
            outside = ev.get("outside")
            self.relay_outside = outside[:300] if isinstance(outside, str) and outside else None
            self.relay_ready.emit(self.relay_port)
            self.changed.emit()

    def _relay_stopped(self, code: int) -> None:
        self.relay, self.relay_port, self.relay_outside = None, None, None
        self.changed.emit()
        self._maybe_quit()

    def stop_group(self) -> None:
        if self.master is not None:
            self.master.stop("stop", STOP_GRACE)
        self._poll.stop()

    def _master_event(self, ev: dict) -> None:
        if ev.get("event") == "listening":
            self.master_info = ev
            self._poll.start(int(POLL_SECONDS * 1000))
            self._poll_master()
            self.master_ready.emit(ev)
            self.changed.emit()

    def _master_crashed(self, code: int, lines: list) -> None:
        tail = [str(x) for x in lines]
        reason = _one_line_reason(tail) or f"the group's master stopped (exit code {code})"
        self.master_problem = reason
        self.last_log = tail[-10:]
        self._poll.stop()
        if self.master_info is None:
            self.master_failed.emit(reason)
        else:
            self.notify.emit("MoLink: the group stopped", reason)
        self.master_info = None
        self.health = None
        self.changed.emit()

    def _master_stopped(self, code: int) -> None:
        self.master_info = None
        self.health = None
        self.members = None
        self._poll.stop()
        self.changed.emit()
        self._maybe_quit()

    def api_base(self) -> str | None:
        return f"http://{self.master_info['api']}" if self.master_info else None

    def dashboard_url(self) -> str | None:
        return self.master_info.get("dashboard") if self.master_info else None

    def _admin(self, method: str, path: str, done: Callable[[int, dict | None], None]) -> None:
        base = self.api_base()
        token = (self.master_info or {}).get("admin_token")
        if base is None or not token:
            done(0, None)
            return
        req = QNetworkRequest(QUrl(base + path))
        req.setRawHeader(b"Authorization", f"Bearer {token}".encode())
        req.setTransferTimeout(HTTP_TIMEOUT_MS)
        reply = self._net.post(req, QByteArray()) if method == "POST" else self._net.get(req)
        reply.finished.connect(lambda: _json_reply(reply, done))

    def request_code(self, on_code: Callable[[dict], None] | None = None) -> None:
        """A fresh pairing code from the local master: given to ``on_code`` when set, else
        announced by ``code_ready``; ``code_failed`` on any failure."""

        def done(status: int, body: dict | None) -> None:
            if status == 200 and body and isinstance(body.get("code"), str):
                info = self.master_info or {}
                port = info.get("group_port")
                host = _lan_address()
                candidates = body.get("candidates")
                if isinstance(candidates, list) and candidates and all(isinstance(x, str) for x in candidates):
                    # every address the master measured it can be reached at (LAN, mapped, IPv6, relay)
                    link = invitation_link(body["code"], info.get("group"), candidates)
                else:
                    link = links.build_link(
                        links.JoinLink(
                            code=body["code"], master=f"{host}:{port}" if port else None, group=info.get("group")
                        )
                    )
                full = {**body, "link": link, "group": info.get("group"), "group_port": port, "host": host}
                on_code(full) if on_code is not None else self.code_ready.emit(full)
            else:
                self.code_failed.emit(_error_text(body) or "the group's master did not answer")

        self._admin("POST", "/admin/code", done)

    def _poll_master(self) -> None:
        base = self.api_base()
        if base is None:
            return
        req = QNetworkRequest(QUrl(base + "/health"))
        req.setTransferTimeout(HTTP_TIMEOUT_MS)
        reply = self._net.get(req)
        reply.finished.connect(lambda: _json_reply(reply, self._health))
        self._admin("GET", "/admin/members", self._members)

    def _health(self, status: int, body: dict | None) -> None:
        self.health = body
        if body is not None:
            tokens = int(body.get("tokens_generated") or 0)
            now = time.monotonic()
            if self._tokens_seen is not None and now > self._tokens_seen[0]:
                self.group_tps = max(0.0, (tokens - self._tokens_seen[1]) / (now - self._tokens_seen[0]))
            self._tokens_seen = (now, tokens)
            self.master_problem = body.get("problem") if body.get("status") != "ok" else None
        self.changed.emit()

    def _members(self, status: int, body: dict | None) -> None:
        if status == 200 and body is not None:
            self.members = body

    # ------------------------------------------------------------------ joining
    def accept_join(self, joined, memory_limit_gb: float | None, share: bool = True) -> None:  # joined: JoinedGroup
        """Keep a pairing the user confirmed and start sharing with that group."""
        if self.worker is not None and self.worker.running():
            self._stop_worker(Sharing.OFF)
        self.paths.worker_dir.mkdir(parents=True, exist_ok=True)
        joined.save(self.paths.worker_dir)
        self.remember(memory_limit_gb=memory_limit_gb)
        self.changed.emit()
        if share:
            self._start_worker()

    # ------------------------------------------------------------------ quitting
    def quit(self) -> None:
        """Stop every child gracefully; ``quit_ready`` once none runs (bounded by the grace)."""
        self._quitting = True
        if self.worker is not None and self.worker.running():
            share_again = self.sharing in (Sharing.STARTING, Sharing.SHARING, Sharing.PROBLEM)
            self._stop_worker(Sharing.OFF)
            self.remember(share_on_start=share_again)
        if self.master is not None and self.master.running():
            self.master.stop("stop", STOP_GRACE)
        if self.relay is not None and self.relay.running():
            self.relay.stop("stop", STOP_GRACE)
        self._maybe_quit()

    def _maybe_quit(self) -> None:
        if not self._quitting:
            return
        if any(s is not None and s.running() for s in (self.worker, self.master, self.relay)):
            return
        self._quitting = False
        self.quit_ready.emit()


def _json_reply(reply: QNetworkReply, done: Callable[[int, dict | None], None]) -> None:
    status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
    data = bytes(reply.readAll().data())
    reply.deleteLater()
    try:
        body = json.loads(data) if data else None
    except ValueError:
        body = None
    done(int(status or 0), body if isinstance(body, dict) else None)


def _error_text(body: dict | None) -> str | None:
    if not body:
        return None
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or "") or None
    return str(err) if err else None


def _one_line_reason(lines: list[str]) -> str | None:
    """The child's own one-line complaint (``molink: ...``), if it printed one."""
    for text in reversed(lines):
        if text.startswith("molink: "):
            return text[len("molink: ") :]
    return None


def _lan_address() -> str:
    """This PC's address on its LAN (where friends dial), found without sending anything."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: UDP connect only picks a route; no packet is sent
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()
