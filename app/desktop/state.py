"""What the tray shows, as data: the sharing state machine and the menu built from a snapshot.

Contract
--------
* :class:`Sharing` is this PC's sharing state; :func:`move` is the only way to change it and
  raises :class:`BadTransition` for a move the table ``_ALLOWED`` does not list.
* :class:`TrayState` is a frozen snapshot of everything the menu, tooltip and icon show; the
  controller makes a new one whenever something changes.
* :func:`menu` turns a snapshot into a list of :class:`Item` (actions, separators,
  submenus) with their texts, enabled and checked flags; the Qt tray and the window mode
  build their widgets from it, so every state's menu is tested here without Qt.
* :func:`status_line` and :func:`icon_kind` give the status text and which icon to show.

Pure: no Qt, no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum


class Sharing(Enum):
    OFF = "off"  # no worker process
    STARTING = "starting"  # the worker runs but serves nothing yet (connecting, loading, standing by)
    SHARING = "sharing"  # the worker serves a layer range
    FINISHING = "finishing"  # the worker leaves after the requests in flight
    STOPPING = "stopping"  # the worker is leaving now
    PAUSED = "paused"  # no worker; sharing resumes at ``paused_until`` or when the user resumes
    PROBLEM = "problem"  # the worker crashed or cannot reach the group; it is retried with backoff


_ALLOWED: dict[Sharing, frozenset[Sharing]] = {
    Sharing.OFF: frozenset({Sharing.STARTING}),
    Sharing.STARTING: frozenset({Sharing.SHARING, Sharing.STOPPING, Sharing.FINISHING, Sharing.PROBLEM, Sharing.OFF}),
    Sharing.SHARING: frozenset({Sharing.STARTING, Sharing.STOPPING, Sharing.FINISHING, Sharing.PROBLEM}),
    Sharing.FINISHING: frozenset({Sharing.STOPPING, Sharing.OFF, Sharing.PAUSED, Sharing.PROBLEM}),
    Sharing.STOPPING: frozenset({Sharing.OFF, Sharing.PAUSED, Sharing.PROBLEM}),
    Sharing.PAUSED: frozenset({Sharing.STARTING, Sharing.OFF}),
    Sharing.PROBLEM: frozenset({Sharing.STARTING, Sharing.SHARING, Sharing.STOPPING, Sharing.OFF, Sharing.PAUSED}),
}


class BadTransition(Exception):
    """A state change the table does not allow: a bug in the caller, reported loudly."""


def move(current: Sharing, new: Sharing) -> Sharing:
    if new is current:
        return current
    if new not in _ALLOWED[current]:
        raise BadTransition(f"sharing cannot go from {current.value} to {new.value}")
    return new


class IconKind(Enum):
    OFF = "off"
    SHARING = "sharing"
    PAUSED = "paused"
    PROBLEM = "problem"


class Act(Enum):
    """Every command the tray menu (and window mode) can send."""

    STATUS = "status"
    SHARE = "share"
    PAUSE_HOUR = "pause-hour"
    PAUSE_UNTIL_RESUMED = "pause-until-resumed"
    KEEP_SHARING = "keep-sharing"
    RESUME = "resume"
    FINISH = "finish"
    CREATE_GROUP = "create-group"
    SHOW_CODE = "show-code"
    STOP_GROUP = "stop-group"
    JOIN_GROUP = "join-group"
    OPEN_CHAT = "open-chat"
    OPEN_DASHBOARD = "open-dashboard"
    COPY_API = "copy-api"
    SETTINGS = "settings"
    OPEN_LOGS = "open-logs"
    RELAY = "relay"
    QUIT = "quit"


@dataclass(frozen=True)
class Action:
    act: Act
    text: str
    enabled: bool = True
    checked: bool | None = None  # None: not checkable


@dataclass(frozen=True)
class Separator:
    pass


@dataclass(frozen=True)
class Submenu:
    text: str
    items: tuple[Item, ...]
    enabled: bool = True


Item = Action | Separator | Submenu


@dataclass(frozen=True)
class TrayState:
    sharing: Sharing = Sharing.OFF
    gpu: str = ""  # "NVIDIA GeForce RTX 3060, 12.0 GB" or "no NVIDIA GPU: CPU, 32 GB RAM"
    paused_until: float | None = None  # epoch seconds; math.inf: until resumed
    joined_group: str | None = None  # the group this PC's worker belongs to
    hosting: bool = False  # this PC runs a group's master
    hosted_group: str | None = None
    master_ready: bool = False  # the local master listens (its API answers)
    group_serving: bool = False  # the local master's pipeline serves
    members_online: int | None = None
    members_total: int | None = None
    members: tuple[str, ...] = ()  # hosting: a line per connected member (:func:`member_line`)
    layers: tuple[int, int] | None = None  # the range this PC serves
    path: str | None = None  # sharing: how this PC's tunnel reaches the master ("LAN", "relayed through R", ...)
    num_layers: int | None = None
    tokens_per_s: float | None = None
    problem: str | None = None  # one sentence
    pause_warning: bool = False  # an automatic pause is coming (the GPU is busy): offer "Keep sharing"
    api_address: str | None = None  # "127.0.0.1:8000" of the local master
    relaying: bool = False  # this PC runs a relay (molink relay) for groups that register at it
    relay_port: int | None = None  # the port it listens on, once it does
    relay_outside: str | None = None  # HOST:PORT friends outside reach it at (its router's mapping), if known
    last_log: tuple[str, ...] = field(default_factory=tuple)  # a crashed child's last lines


def member_line(w: dict) -> str:
    """A connected member for people, from a row of the master's ``describe()``: its name, how
    its tunnel reaches this PC (LAN, direct, IPv6, relayed), the round trip and bandwidth it
    measured, and its layers."""
    parts = [w.get("path") or "path unknown"]
    if w.get("rtt_ms"):
        parts.append(f"{w['rtt_ms']:.0f} ms")
    if w.get("link_mbps"):
        parts.append(f"{w['link_mbps']:.0f} Mbit/s")
    layers = w.get("layers")
    if layers:
        parts.append(f"layers {layers[0]}–{layers[1] - 1}")
    return f"{w.get('name', '?')}: {', '.join(parts)}"


def _until(ts: float | None, now: float) -> str:
    if ts is None or math.isinf(ts):
        return "until you resume"
    left = max(0, ts - now)
    if left < 3600 * 20:
        return f"until {time.strftime('%H:%M', time.localtime(ts))}"
    return f"until {time.strftime('%a %H:%M', time.localtime(ts))}"


def status_line(s: TrayState, now: float) -> str:
    """One line: what this PC does for which group, and how it goes."""
    parts: list[str] = []
    if s.sharing is Sharing.SHARING:
        what = "Sharing"
        if s.layers:
            what += f" layers {s.layers[0]}–{s.layers[1] - 1}" + (f" of {s.num_layers}" if s.num_layers else "")
        parts.append(what)
    elif s.sharing is Sharing.STARTING:
        parts.append("Starting to share…")
    elif s.sharing is Sharing.FINISHING:
        parts.append("Finishing current requests, then stopping")
    elif s.sharing is Sharing.STOPPING:
        parts.append("Leaving the group…")
    elif s.sharing is Sharing.PAUSED:
        parts.append(f"Paused {_until(s.paused_until, now)}")
    elif s.sharing is Sharing.PROBLEM:
        parts.append(f"Problem: {s.problem or 'the engine stopped'}")
    else:
        parts.append("Not sharing")
    group = s.joined_group or s.hosted_group
    if group:
        parts.append(f"group “{group}”")
    if s.members_online is not None:
        parts.append(
            f"{s.members_online} of {s.members_total} online" if s.members_total else f"{s.members_online} online"
        )
    if s.tokens_per_s:
        parts.append(f"{s.tokens_per_s:.1f} tokens/s")
    return " · ".join(parts)


def tooltip(s: TrayState, now: float) -> str:
    lines = ["MoLink", status_line(s, now)]
    if s.gpu:
        lines.append(s.gpu)
    if s.path and s.sharing in (Sharing.SHARING, Sharing.FINISHING):
        lines.append(f"Reaches the group: {s.path}")
    if s.hosting:
        lines.append("This PC runs the group" + (" (serving)" if s.group_serving else ""))
    return "\n".join(lines)


def icon_kind(s: TrayState) -> IconKind:
    if s.sharing is Sharing.PROBLEM or (s.hosting and s.problem):
        return IconKind.PROBLEM
    if s.sharing is Sharing.PAUSED:
        return IconKind.PAUSED
    if s.sharing in (Sharing.SHARING, Sharing.FINISHING) or (s.hosting and s.group_serving):
        return IconKind.SHARING
    return IconKind.OFF


def can_share(s: TrayState) -> bool:
    return s.joined_group is not None


def menu(s: TrayState, now: float) -> list[Item]:
    """The tray menu for this snapshot, top to bottom."""
    active = s.sharing in (Sharing.STARTING, Sharing.SHARING, Sharing.PROBLEM)
    leaving = s.sharing in (Sharing.FINISHING, Sharing.STOPPING)
    share_text = "Share my GPU" if can_share(s) else "Share my GPU (join or create a group first)"
    items: list[Item] = [
        Action(Act.STATUS, status_line(s, now), enabled=False),
    ]
    if s.gpu:
        items.append(Action(Act.STATUS, s.gpu, enabled=False))
    if s.path and s.sharing in (Sharing.SHARING, Sharing.FINISHING):
        items.append(Action(Act.STATUS, f"Reaches the group: {s.path}", enabled=False))
    items += [
        Separator(),
        Action(Act.SHARE, share_text, enabled=can_share(s) and not leaving, checked=active or leaving),
    ]
    if s.sharing is Sharing.PAUSED:
        items.append(Action(Act.RESUME, "Resume sharing"))
    else:
        items.append(
            Submenu(
                "Pause sharing",
                (Action(Act.PAUSE_HOUR, "For 1 hour"), Action(Act.PAUSE_UNTIL_RESUMED, "Until I resume")),
                enabled=active,
            )
        )
    if s.problem and s.last_log:
        items.append(
            Submenu(
                "Why? (last log lines)",
                tuple(Action(Act.STATUS, line[:120], enabled=False) for line in s.last_log[-8:]),
            )
        )
    if s.pause_warning:
        items.append(Action(Act.KEEP_SHARING, "Keep sharing (the GPU is busy: pausing in a minute)"))
    items += [
        Action(Act.FINISH, "Finish and stop (after current requests)", enabled=active),
        Separator(),
        Action(Act.OPEN_CHAT, "Open chat…"),
        Action(Act.OPEN_DASHBOARD, "Open dashboard", enabled=s.hosting and s.master_ready),
        Action(Act.COPY_API, "Copy API address", enabled=s.hosting and s.master_ready and s.api_address is not None),
        Separator(),
    ]
    if s.hosting:
        if s.members:
            items.append(
                Submenu(
                    f"Members ({len(s.members)} connected)",
                    tuple(Action(Act.STATUS, line, enabled=False) for line in s.members),
                )
            )
        items += [
            Action(Act.SHOW_CODE, "Show a pairing code…", enabled=s.master_ready),
            Action(Act.STOP_GROUP, "Stop the group on this PC"),
        ]
    else:
        items.append(Action(Act.CREATE_GROUP, "Create a group on this PC…"))
    relay_text = "Relay for groups on this PC"
    if s.relaying and s.relay_port:
        relay_text += f" (friends use {s.relay_outside})" if s.relay_outside else f" (port {s.relay_port})"
    items += [
        Action(Act.JOIN_GROUP, "Join a group…"),
        Action(Act.RELAY, relay_text, checked=s.relaying),
        Separator(),
        Action(Act.SETTINGS, "Settings…"),
        Action(Act.OPEN_LOGS, "Open logs folder"),
        Separator(),
        Action(Act.QUIT, "Quit MoLink"),
    ]
    return items


def action_texts(items: list[Item]) -> list[str]:
    """Every action's text, submenus flattened as ``Parent ▸ Child`` (the selftest prints these)."""
    out: list[str] = []
    for it in items:
        if isinstance(it, Action):
            out.append(it.text)
        elif isinstance(it, Submenu):
            out += [f"{it.text} ▸ {sub.text}" for sub in it.items if isinstance(sub, Action)]
    return out
