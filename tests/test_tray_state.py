"""The tray's state machine and menu, as data (no Qt)."""

import math

import pytest

from app.desktop.state import (
    Act,
    Action,
    BadTransition,
    IconKind,
    Sharing,
    Submenu,
    TrayState,
    action_texts,
    icon_kind,
    member_line,
    menu,
    move,
    status_line,
    tooltip,
)

NOW = 1_800_000_000.0


def actions(items):
    out = {}
    for it in items:
        if isinstance(it, Action):
            out.setdefault(it.act, it)
        elif isinstance(it, Submenu):
            for sub in it.items:
                out[sub.act] = Action(sub.act, sub.text, sub.enabled and it.enabled, sub.checked)
    return out


def test_transitions_follow_the_table():
    assert move(Sharing.OFF, Sharing.STARTING) is Sharing.STARTING
    assert move(Sharing.SHARING, Sharing.STOPPING) is Sharing.STOPPING
    assert move(Sharing.STOPPING, Sharing.PAUSED) is Sharing.PAUSED
    assert move(Sharing.PAUSED, Sharing.STARTING) is Sharing.STARTING
    for bad in [
        (Sharing.OFF, Sharing.SHARING),
        (Sharing.OFF, Sharing.PAUSED),
        (Sharing.PAUSED, Sharing.SHARING),
        (Sharing.STOPPING, Sharing.SHARING),
    ]:
        with pytest.raises(BadTransition):
            move(*bad)


def test_menu_when_not_in_a_group():
    items = menu(TrayState(gpu="CPU"), NOW)
    a = actions(items)
    assert not a[Act.SHARE].enabled and a[Act.SHARE].checked is False
    assert "join or create a group first" in a[Act.SHARE].text
    assert not a[Act.PAUSE_HOUR].enabled and not a[Act.FINISH].enabled
    assert a[Act.CREATE_GROUP].enabled and a[Act.JOIN_GROUP].enabled
    assert not a[Act.OPEN_DASHBOARD].enabled and not a[Act.COPY_API].enabled
    assert Act.SHOW_CODE not in a and Act.STOP_GROUP not in a
    assert a[Act.QUIT].enabled and a[Act.SETTINGS].enabled and a[Act.OPEN_LOGS].enabled and a[Act.OPEN_CHAT].enabled
    assert items[0].text == "Not sharing"


def test_menu_while_sharing():
    s = TrayState(sharing=Sharing.SHARING, joined_group="Friends", layers=(12, 24), num_layers=30, tokens_per_s=8.25)
    a = actions(menu(s, NOW))
    assert a[Act.SHARE].enabled and a[Act.SHARE].checked is True
    assert a[Act.PAUSE_HOUR].enabled and a[Act.PAUSE_UNTIL_RESUMED].enabled and a[Act.FINISH].enabled
    assert Act.RESUME not in a
    line = status_line(s, NOW)
    assert line == "Sharing layers 12–23 of 30 · group “Friends” · 8.2 tokens/s"
    assert icon_kind(s) is IconKind.SHARING


def test_menu_while_leaving_has_the_toggle_locked():
    for st in (Sharing.STOPPING, Sharing.FINISHING):
        a = actions(menu(TrayState(sharing=st, joined_group="g"), NOW))
        assert not a[Act.SHARE].enabled and a[Act.SHARE].checked is True
        assert not a[Act.FINISH].enabled


def test_menu_when_paused_offers_resume():
    s = TrayState(sharing=Sharing.PAUSED, joined_group="g", paused_until=math.inf)
    a = actions(menu(s, NOW))
    assert a[Act.RESUME].enabled and Act.PAUSE_HOUR not in a
    assert a[Act.SHARE].checked is False
    assert status_line(s, NOW).startswith("Paused until you resume")
    assert icon_kind(s) is IconKind.PAUSED
    timed = TrayState(sharing=Sharing.PAUSED, joined_group="g", paused_until=NOW + 3600)
    assert "Paused until " in status_line(timed, NOW) and "resume" not in status_line(timed, NOW)


def test_menu_when_hosting():
    s = TrayState(
        hosting=True,
        hosted_group="Friends",
        master_ready=True,
        group_serving=True,
        members_online=2,
        members_total=3,
        api_address="127.0.0.1:8000",
    )
    a = actions(menu(s, NOW))
    assert (
        a[Act.OPEN_DASHBOARD].enabled
        and a[Act.COPY_API].enabled
        and a[Act.SHOW_CODE].enabled
        and a[Act.STOP_GROUP].enabled
    )
    assert Act.CREATE_GROUP not in a
    assert "2 of 3 online" in status_line(s, NOW)
    assert icon_kind(s) is IconKind.SHARING
    starting = actions(menu(TrayState(hosting=True), NOW))
    assert not starting[Act.SHOW_CODE].enabled and not starting[Act.OPEN_DASHBOARD].enabled
    assert not any(t.startswith("Members") for t in action_texts(menu(s, NOW)))  # none connected: no submenu


def test_hosting_menu_lists_each_members_path():
    rows = [
        {"name": "alice", "path": "LAN", "rtt_ms": 1.4, "link_mbps": 940.2, "layers": [0, 12]},
        {"name": "friend", "path": "relayed", "rtt_ms": 61.0, "link_mbps": 18.6, "layers": [12, 24]},
        {"name": "new", "path": "direct"},  # not measured or placed yet
    ]
    lines = tuple(member_line(w) for w in rows)
    assert lines == (
        "alice: LAN, 1 ms, 940 Mbit/s, layers 0–11",
        "friend: relayed, 61 ms, 19 Mbit/s, layers 12–23",
        "new: direct",
    )
    s = TrayState(hosting=True, hosted_group="Friends", master_ready=True, members_online=3, members=lines)
    texts = action_texts(menu(s, NOW))
    assert "Members (3 connected) ▸ friend: relayed, 61 ms, 19 Mbit/s, layers 12–23" in texts


def test_problem_state_shows_why_and_keeps_the_toggle_on():
    s = TrayState(sharing=Sharing.PROBLEM, joined_group="g", problem="cannot reach the master")
    a = actions(menu(s, NOW))
    assert a[Act.SHARE].checked is True and a[Act.SHARE].enabled
    assert status_line(s, NOW).startswith("Problem: cannot reach the master")
    assert icon_kind(s) is IconKind.PROBLEM


def test_action_texts_flatten_submenus():
    texts = action_texts(menu(TrayState(joined_group="g"), NOW))
    assert "Pause sharing ▸ For 1 hour" in texts and "Pause sharing ▸ Until I resume" in texts
    assert texts[-1] == "Quit MoLink"


def test_a_sharing_pc_shows_how_it_reaches_the_group():
    s = TrayState(sharing=Sharing.SHARING, joined_group="g", path="relayed through 25.0.0.100:7735")
    assert "Reaches the group: relayed through 25.0.0.100:7735" in action_texts(menu(s, NOW))
    assert "Reaches the group: relayed through 25.0.0.100:7735" in tooltip(s, NOW)
    off = TrayState(joined_group="g", path="LAN")  # not sharing: no path is current
    assert not any(t.startswith("Reaches the group") for t in action_texts(menu(off, NOW)))


def test_the_relay_toggle_says_where_friends_reach_it():
    off = action_texts(menu(TrayState(), NOW))
    assert "Relay for groups on this PC" in off
    s = TrayState(relaying=True, relay_port=7735)
    assert "Relay for groups on this PC (port 7735)" in action_texts(menu(s, NOW))
    mapped = TrayState(relaying=True, relay_port=7735, relay_outside="25.0.0.10:7735")
    assert "Relay for groups on this PC (friends use 25.0.0.10:7735)" in action_texts(menu(mapped, NOW))
    assert actions(menu(mapped, NOW))[Act.RELAY].checked is True
