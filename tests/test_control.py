"""The control channel of supervised engine processes (worker_core.control) and a worker's
graceful leave: real `molink master|worker --supervised` processes, commands on stdin, events
on stdout, the HTTP API for requests; plus the wire message and the master's draining state."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness import Cluster, greedy, run
from tiny_models import make_tiny_checkpoint, reference_greedy

from worker_core import wire
from worker_core.control import EVENT_PREFIX, BadCommand, Command, Control, Events, parse_command
from worker_core.wire import Leave, ProtocolError, decode, encode

REPO = Path(__file__).resolve().parent.parent
PROMPT = [5, 6, 7, 8, 9, 10, 11]
STARTUP = 120.0  # seconds a child may take to start on a busy 2-core machine


# --------------------------------------------------------------------------- children


class Child:
    """One `python -m app.cli ... --supervised` process: events from stdout (timestamped),
    stderr to a file, commands to stdin.  Every wait is bounded."""

    info: dict  # a master's `listening` event (set by the fixture that starts it)
    api: str  # that master's API address

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - the child's stderr until stop() closes it
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args, "--supervised"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.events: list[tuple[float, dict]] = []
        self.other_stdout: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                if line.startswith(EVENT_PREFIX):
                    self.events.append((time.monotonic(), json.loads(line[len(EVENT_PREFIX) :])))
                else:
                    self.other_stdout.append(line)
                self._cond.notify_all()

    def wait_event(self, name: str, timeout: float = 60.0, where=lambda e: True, after: int = 0) -> tuple[float, dict]:
        """The first event ``name`` (satisfying ``where``) at index >= ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, e in self.events[after:]:
                    if e["event"] == name and where(e):
                        return t, e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._more_coming():
                    seen = [e for _, e in self.events]
                    raise AssertionError(f"no {name!r} event within {timeout} s; events: {seen}\n{self.tail()}")
                self._cond.wait(min(left, 0.2))

    def _more_coming(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed and self.proc.poll() is None

    def names(self) -> list[str]:
        with self._cond:
            return [e["event"] for _, e in self.events]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, cmd: str) -> None:
        self.send(json.dumps({"cmd": cmd}))

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{self.tail()}") from None

    def tail(self, n: int = 30) -> str:
        self._stderr.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._stderr.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ctl") / "llama", num_layers=4, seed=1)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture()
def spawn(logs, request):
    children: list[Child] = []

    def start(*args: str, name: str) -> Child:
        c = Child(list(args), logs / f"{request.node.name}-{name}.log")
        children.append(c)
        return c

    yield start
    for c in children:
        c.kill()


@pytest.fixture(scope="module")
def master(ckpt, logs):
    """A master shared by the worker tests; each test leaves it with no workers."""
    m = Child(["master", "--model", str(ckpt), "--port", "0", "--min-workers", "1"], logs / "master.log")
    try:
        _, ev = m.wait_event("listening", STARTUP)
        m.info = ev
        m.api = ev["api"]
        yield m
    finally:
        m.kill()


def health(api: str) -> dict:
    try:
        with urllib.request.urlopen(f"http://{api}/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while not serving: same body
        return json.loads(e.read())


def wait_health(api: str, ok, timeout: float = 60.0, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(api)
        if ok(h):
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"/health never showed {what}: {h}")
        time.sleep(0.1)


def start_worker(spawn, master, name: str, *extra: str) -> Child:
    args = ("worker", "--master", master.api, "--device", "cpu", "--name", name, "--threads", "1", *extra)
    return spawn(*args, name=name)


class Stream:
    """A streamed greedy /v1/completions request read by a thread: (arrival time, token) per
    token, the finish reason, the time it ended."""

    def __init__(self, api: str, model: str, prompt: list[int], max_tokens: int) -> None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "logprobs": 0,
        }
        self.req = urllib.request.Request(
            f"http://{api}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        self.tokens: list[tuple[float, str]] = []
        self.finish: str | None = None
        self.ended: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with urllib.request.urlopen(self.req, timeout=120) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    if choice.get("logprobs"):
                        self.tokens.extend((time.monotonic(), t) for t in choice["logprobs"]["tokens"])
                    if choice.get("finish_reason"):
                        self.finish = choice["finish_reason"]
            self.ended = time.monotonic()
        except BaseException as e:  # reported by join()
            self.error = e

    def wait_tokens(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tokens) < n:
            if self.error or self.ended or time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.tokens)} tokens (error {self.error!r}, ended {self.ended})")
            time.sleep(0.01)

    def join(self, timeout: float = 120.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the stream did not end in time")
        if self.error:
            raise self.error


def reference_tokens(ckpt: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt).convert_ids_to_tokens(reference_greedy(ckpt, PROMPT, n))


def two_placed(h: dict) -> bool:
    """Serving, with two workers each either holding layers or standing by."""
    return h["status"] == "ok" and len(h["workers"]) == 2 and all(w["layers"] or w["standby"] for w in h["workers"])


def stage_workers(h: dict) -> list[str]:
    return [w["name"] for w in h["workers"] if w["layers"]]


# --------------------------------------------------------------------------- the protocol module


def test_parse_command_accepts_the_commands_and_names_every_defect():
    assert parse_command('{"cmd": "stop"}\n') is Command.STOP
    assert parse_command(b'{"cmd":"finish"}') is Command.FINISH
    for bad in ("stop", '{"cmd": "dance"}', '{"cmd": 5}', '["stop"]', "{", b"\xff\xfe", '{"command": "stop"}'):
        with pytest.raises(BadCommand):
            parse_command(bad)


def test_control_reads_lines_skips_bad_ones_and_eof_is_stop():
    r, w = os.pipe()

    def write() -> None:  # more than a pipe holds: written while the reader reads
        with os.fdopen(w, "wb") as out:
            out.write(b'not json\n{"cmd": "finish"}\n\n{"cmd": "nope"}\n' + b"x" * 100_000 + b'\n{"cmd": "stop"}\n')

    threading.Thread(target=write, daemon=True).start()

    async def main():
        c = Control(r)
        return [await asyncio.wait_for(c.next(), 10) for _ in range(3)]

    try:
        assert run(main(), 30) == [Command.FINISH, Command.STOP, Command.STOP]  # the last one is EOF
    finally:
        os.close(r)


def test_events_are_one_prefixed_json_line_each_and_disabled_writes_nothing():
    buf = io.StringIO()
    Events(buf).emit("serving", layers=[0, 4], num_layers=4, epoch=2)
    Events(buf).emit("error", message="a\nb")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith(EVENT_PREFIX) for line in lines)
    first = json.loads(lines[0][len(EVENT_PREFIX) :])
    assert first == {"event": "serving", "layers": [0, 4], "num_layers": 4, "epoch": 2}
    assert not Events().enabled
    Events().emit("left")  # no stream: nothing, no error


def test_leave_round_trips_and_a_bad_leave_is_a_protocol_error():
    for finish in (True, False):
        assert decode(encode(Leave(finish))) == Leave(finish)
    frame = encode(Leave(True))
    header = frame[9:]
    spoiled = [
        frame[: 9 - 4] + len(b'{"finish":1}').to_bytes(4, "big") + b'{"finish":1}',  # not a boolean
        frame[: 9 - 4] + len(b"{}").to_bytes(4, "big") + b"{}",  # missing
        frame + b"x",  # a payload
        frame[:3] + bytes([wire.PROTOCOL_VERSION - 1]) + frame[4:],  # an older peer
    ]
    assert header == b'{"finish":true}'
    for bad in spoiled:
        with pytest.raises(ProtocolError):
            decode(bad)


# --------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_a_workers_life_events_bad_command_lines_ignored_and_stop_leaves_the_only_stage(spawn, master):
    """One worker process, from dialling to leaving: its events up to stats, then bad command
    lines that change nothing, then stop."""
    assert master.info["api"].startswith("127.0.0.1:") and int(master.info["api"].split(":")[1]) > 0
    assert "token=" in master.info["dashboard"]
    assert master.info["group_port"] is None and master.info["admin_token"] is None and master.info["group"] is None
    w = start_worker(spawn, master, "alpha")
    _, ev = w.wait_event("connecting", STARTUP)
    assert ev["master"] == master.api
    w.wait_event("connected", 30)
    _, ev = w.wait_event("serving", 60)
    assert ev["layers"] == [0, 4] and ev["num_layers"] == 4 and ev["epoch"] >= 1
    # the master profiles a new pipeline: this stage computed steps, and stats say so
    _, ev = w.wait_event("stats", 30, where=lambda e: e["steps"] > 0)
    assert ev["tokens"] > 0 and ev["tokens_per_s"] >= 0
    assert w.other_stdout == []  # supervised stdout carries events only

    for line in ("not json", '{"cmd": "dance"}', '["stop"]', '{"cmd": 5}', "{"):
        w.send(line)
    # still alive and still working: a stats event after the bad lines, the master still has it
    mark = len(w.events)
    w.wait_event("stats", 30, after=mark)
    assert w.proc.poll() is None
    assert [x["name"] for x in health(master.api)["workers"]] == ["alpha"]
    assert "malformed command line" in w.tail(200)

    t_stop = time.monotonic()
    w.command("stop")
    _, ev = w.wait_event("disconnected", 30)
    assert "left the group" in ev["reason"]
    t_left, _ = w.wait_event("left", 30)
    assert w.wait_exit(30) == 0
    assert t_left - t_stop < 10
    h = wait_health(master.api, lambda h: h["workers"] == [], 30, "no workers")
    assert h["status"] == "unavailable"


@pytest.mark.slow
def test_leaving_mid_stream_loses_and_repeats_no_token(spawn, master, ckpt):
    n = 60
    want = reference_tokens(ckpt, n)
    workers = {name: start_worker(spawn, master, name, "--link-delay-ms", "20") for name in ("gamma", "delta")}
    h = wait_health(master.api, two_placed, STARTUP, "two placed workers")
    epoch = h["epoch"]
    leaver = workers[stage_workers(h)[0]]
    stays = next(w for w in workers.values() if w is not leaver)
    s = Stream(master.api, master.info["model"], PROMPT, n)
    s.wait_tokens(10)
    leaver.command("stop")
    t_left, _ = leaver.wait_event("left", 30)
    assert leaver.wait_exit(30) == 0
    s.join()
    assert s.finish == "length"
    assert [t for _, t in s.tokens] == want  # nothing lost, nothing repeated
    assert t_left < s.ended  # it left while the request ran
    h = wait_health(master.api, lambda h: h["status"] == "ok", 60, "serving again")
    assert h["epoch"] > epoch and [w["name"] for w in h["workers"]] == [stays_name(workers, stays)]
    stays.command("stop")
    assert stays.wait_exit(30) == 0
    wait_health(master.api, lambda h: h["workers"] == [], 30, "no workers")


def stays_name(workers: dict, child: Child) -> str:
    return next(k for k, v in workers.items() if v is child)


@pytest.mark.slow
def test_finish_lets_the_running_request_end_on_the_same_pipeline_then_leaves(spawn, master, ckpt):
    n = 40
    want = reference_tokens(ckpt, n)
    workers = {name: start_worker(spawn, master, name, "--link-delay-ms", "20") for name in ("eps", "zeta")}
    h = wait_health(master.api, two_placed, STARTUP, "two placed workers")
    epoch = h["epoch"]
    name = stage_workers(h)[0]
    leaver = workers[name]
    marks = {k: len(w.events) for k, w in workers.items()}
    s = Stream(master.api, master.info["model"], PROMPT, n)
    s.wait_tokens(5)
    leaver.command("finish")
    # the master keeps it, draining, on the same epoch while the request runs
    draining = lambda h: any(w["name"] == name and w["state"] == "draining" for w in h["workers"])  # noqa: E731
    h = wait_health(master.api, draining, 20, "draining")
    assert h["epoch"] == epoch and h["running"] == 1
    s.join()
    t_left, _ = leaver.wait_event("left", 60)
    assert leaver.wait_exit(30) == 0
    assert s.finish == "length" and [t for _, t in s.tokens] == want
    assert t_left > s.tokens[-1][0]  # it left after the last token
    for k, w in workers.items():  # no worker was re-assigned while the request ran
        assert all(t > s.tokens[-1][0] for t, e in w.events[marks[k] :] if e["event"] == "serving"), k
    h = wait_health(master.api, lambda h: h["status"] == "ok" and len(h["workers"]) == 1, 60, "serving without it")
    assert h["epoch"] > epoch and h["workers"][0]["name"] != name
    other = next(w for k, w in workers.items() if k != name)
    other.close_stdin()  # EOF is stop too
    assert other.wait_exit(30) == 0
    assert "left" in other.names()
    wait_health(master.api, lambda h: h["workers"] == [], 30, "no workers")


@pytest.mark.slow
def test_eof_on_stdin_stops_a_worker_and_a_master(spawn, ckpt):
    m = spawn("master", "--model", str(ckpt), "--port", "0", "--min-workers", "1", name="m")
    _, ev = m.wait_event("listening", STARTUP)
    w = spawn("worker", "--master", ev["api"], "--device", "cpu", "--name", "eta", "--threads", "1", name="w")
    w.wait_event("serving", STARTUP)
    w.close_stdin()
    assert w.wait_exit(30) == 0
    assert w.names()[-1] == "left"
    wait_health(ev["api"], lambda h: h["workers"] == [], 30, "no workers")
    m.close_stdin()
    m.wait_event("stopping", 30)
    assert m.wait_exit(30) == 0


@pytest.mark.slow
def test_stop_while_not_connected_just_exits(spawn):
    w = spawn("worker", "--master", "127.0.0.1:9", "--device", "cpu", "--name", "theta", "--threads", "1", name="w")
    _, ev = w.wait_event("error", STARTUP)
    assert "cannot reach the master" in ev["message"]
    w.command("stop")
    assert w.wait_exit(30) == 0
    assert w.names()[-1] == "left" and "connected" not in w.names()


# --------------------------------------------------------------------------- the master's draining state


def test_a_draining_worker_is_not_placed_again_when_the_group_replans(ckpt):
    """In process: w0 finishes (DRAINING) while a request runs; w1 then vanishes, the group
    re-plans without w0 (and w0 leaves then), and the request still gets every token right."""
    want = reference_greedy(ckpt, PROMPT, 40)

    async def main():
        from master_core.link import LinkState

        opts = [{"link_delay_ms": 5.0} for _ in range(3)]
        async with Cluster(ckpt, workers=3, min_workers=1, worker_options=opts) as c:
            g = c.master.group
            gen = asyncio.create_task(c.engine.generate(PROMPT, greedy(40)))
            while c.engine.tokens_generated < 5:
                await asyncio.sleep(0.01)
            w0 = next(link for link in g.stages if link.name == "w0")
            g.leave(w0, True)
            assert w0.state is LinkState.DRAINING and w0 in g.stages and w0 not in g.placeable_links()
            epoch = g.epoch
            c.tasks[1].cancel()  # w1 disappears: a re-plan while w0 drains
            while not (g.serving and g.epoch > epoch):
                await asyncio.sleep(0.01)
            stages = [link.name for link in g.stages]
            tokens = (await gen)[0]
            for _ in range(200):
                if w0.state is LinkState.GONE:
                    break
                await asyncio.sleep(0.01)
            return stages, tokens, w0.state, w0.gone_reason

    stages, tokens, state, reason = run(main(), 180)
    assert stages == ["w2"] and tokens == want
    assert state.value == "gone" and reason == "left the group"


@pytest.mark.slow
def test_group_create_reports_its_free_ports_and_admin_token_and_stops(spawn, ckpt, tmp_path):
    m = spawn(
        "group",
        "create",
        "--model",
        str(ckpt),
        "--port",
        "0",
        "--api-port",
        "0",
        "--host",
        "127.0.0.1",
        "--name",
        "ctl-test",
        "--data-dir",
        str(tmp_path / "group"),
        name="group",
    )
    _, ev = m.wait_event("listening", STARTUP)
    assert ev["group"] == "ctl-test" and isinstance(ev["group_port"], int) and ev["group_port"] > 0
    assert ev["api"].startswith("127.0.0.1:") and ev["admin_token"] and ev["model"] == "llama"
    auth = {"Authorization": f"Bearer {ev['admin_token']}"}
    req = urllib.request.Request(f"http://{ev['api']}/admin/members", headers=auth)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["group"] == "ctl-test"
    assert m.other_stdout == []  # the pairing code and the rest went to stderr
    m.command("stop")
    m.wait_event("stopping", 30)
    assert m.wait_exit(30) == 0
