"""The chat window: pure helpers, then the window against a real master + worker (subprocesses) and,
for scripted streams (Markdown, broken streams, 503), a small stdlib HTTP server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import QDialogButtonBox

from app.desktop.chat import ChatWindow
from app.desktop.chat_text import (
    ChatTarget,
    Chunk,
    HealthView,
    TokenMeter,
    Turn,
    chat_body,
    error_sentence,
    parse_health,
    parse_target,
    read_chunk,
    sentence,
    status_text,
    transcript_markdown,
)

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 512  # the tiny model's max_position_embeddings


# =========================================================================== pure helpers


def test_parse_target():
    assert parse_target("192.168.1.20:8001") == ChatTarget("http://192.168.1.20:8001")
    assert parse_target(" http://example.org/ ", " k ") == ChatTarget("http://example.org:8000", "k")
    assert parse_target("https://h.example") == ChatTarget("https://h.example:443")
    assert parse_target("[::1]:9000", "") == ChatTarget("http://[::1]:9000")
    for bad in ("", "   ", "ftp://h:1", "h:99999", "h:abc", "http://h:1/v1", "http://:80"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_chat_body_sends_history_and_extra_fields_win():
    history = [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")]
    body = chat_body("m", history)
    assert body["model"] == "m" and body["stream"] is True and body["max_tokens"] == 512
    assert "temperature" not in body  # the server's default
    assert body["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    body = chat_body("m", history, 64, {"temperature": 0, "ignore_eos": True, "max_tokens": 9})
    assert body["temperature"] == 0 and body["ignore_eos"] is True and body["max_tokens"] == 9


def test_read_chunk():
    assert read_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) == Chunk()
    assert read_chunk({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}) == Chunk("hi")
    assert read_chunk({"choices": [{"delta": {}, "finish_reason": "length"}]}) == Chunk(finish_reason="length")
    assert read_chunk({"choices": [], "usage": {"completion_tokens": 7}}).completion_tokens == 7
    usage = {"prompt_tokens": 40, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 32}}
    assert read_chunk({"choices": [], "usage": usage}) == Chunk(completion_tokens=7, prompt_tokens=40, cached_tokens=32)
    assert read_chunk({"usage": {"prompt_tokens": True, "prompt_tokens_details": {"cached_tokens": -1}}}) == Chunk()
    err = read_chunk({"error": {"message": "stage 1 died\nbadly", "type": "service_unavailable"}})
    assert err.error == "The group failed while answering: stage 1 died badly."
    assert read_chunk({"choices": "nonsense", "usage": 3}) == Chunk()


def test_error_sentence():
    msg = "max_tokens 100000 exceeds the limit of 4096"
    body = json.dumps({"error": {"message": msg, "type": "invalid_request_error"}}).encode()
    assert error_sentence(400, body) == f"The master refused the request (HTTP 400): {msg}."
    assert error_sentence(502, b"<html>bad gateway</html>") == "The master answered HTTP 502."
    assert "API key" in error_sentence(401, b"{}")
    busy = json.dumps({"error": {"message": "no workers"}}).encode()
    assert error_sentence(503, busy) == "The group cannot answer now: no workers."
    long = sentence("x " * 1000)
    assert len(long) <= 301 and "\n" not in long


def test_parse_health():
    workers = [{"stage": 0}, {"stage": 1}, {"stage": None}]
    ok = {"status": "ok", "problem": None, "model": "m", "workers": workers, "running": 0}
    assert parse_health(200, json.dumps(ok).encode(), "http://h:1") == HealthView(True, None, 2, "m")
    bad = {"status": "unavailable", "problem": "waiting for workers (0 of 2 joined)", "workers": []}
    v = parse_health(503, json.dumps(bad).encode(), "http://h:1")
    assert not v.serving and v.reason == "The group cannot answer now: waiting for workers (0 of 2 joined)."
    v = parse_health(None, b"", "http://h:1", "connection refused")
    assert not v.serving and v.reason == "Cannot reach the master at http://h:1 (connection refused)."
    assert not parse_health(200, b"not json", "http://h:1").serving
    assert not parse_health(401, b"", "http://h:1").serving


def test_token_meter_and_status_line():
    m = TokenMeter()
    assert m.rate() is None
    m.token(10.0)
    assert m.rate() is None  # one token has no duration
    for i in range(1, 11):
        m.token(10.0 + i * 0.1)
    assert m.rate() == pytest.approx(10.0)  # 10 tokens after the first, over 1 s
    m.final_tokens = 21  # the usage count replaces the piece count
    assert m.rate() == pytest.approx(20.0)
    assert status_text("m", 12.34, 1) == "Model: m · 12.3 tokens/s · served by 1 PC"
    assert status_text("m", None, 3) == "Model: m · served by 3 PCs"
    assert status_text(None, None, 0) == "Model: …"


def test_transcript_markdown():
    h = [Turn("user", "q1"), Turn("assistant", "**a1**"), Turn("user", "q2"), Turn("assistant", "a2")]
    md = transcript_markdown(h)
    assert md.index("q1") < md.index("**a1**") < md.index("q2") < md.index("a2")
    assert "**You:**" in md and "**Assistant:**" in md
    assert transcript_markdown(h, last_only=True) == "a2"
    assert transcript_markdown([], last_only=True) == ""


# =========================================================================== servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@dataclass
class RealMaster:
    url: str
    model: str
    log: Path

    def health(self) -> dict:
        return http_json(self.url + "/health", timeout=5)[1]


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("chat")
    folder = make_tiny_checkpoint("llama", tmp / "tiny", num_layers=2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if not config.get("chat_template") and not (folder / "chat_template.jinja").exists():
        from tiny_models import CHAT_TEMPLATE

        config["chat_template"] = CHAT_TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    port = free_port()
    log = tmp / "engine.log"
    procs: list[subprocess.Popen] = []
    with open(log, "wb") as out:
        try:
            for args in (
                ["master", "--model", str(folder), "--port", str(port)],
                ["worker", "--master", f"127.0.0.1:{port}", "--device", "cpu", "--name", "w0"],
            ):
                cmd = [sys.executable, "-m", "app.cli", *args]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                dead = [p.args[3] for p in procs if p.poll() is not None]
                assert not dead, f"{dead} exited early:\n{log.read_text()[-3000:]}"
                try:
                    status, _ = http_json(url + "/health", timeout=2)
                except OSError:
                    status = 0
                if status == 200:
                    break
                assert time.monotonic() < deadline, f"the group did not serve within 180 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
            model = http_json(url + "/v1/models", timeout=5)[1]["data"][0]["id"]
            yield RealMaster(url, model, log)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


class FakeMaster:
    """A scripted OpenAI-like server (stdlib, a thread) for streams the tiny model cannot produce."""

    def __init__(self) -> None:
        self.health = (200, {"status": "ok", "problem": None, "model": "fake", "workers": [{"stage": 0}, {"stage": 1}]})
        self.chunks: list[bytes] = []
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/health":
                    self._json(*fake.health)
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "no such path"}})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    ({k.lower(): v for k, v in self.headers.items()}, body)
                )  # names are case-insensitive
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for c in fake.chunks:
                    self.wfile.write(c)
                    self.wfile.flush()
                    time.sleep(0.01)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stream(self, pieces: list[str], tail: bytes = b"data: [DONE]\r\n\r\n", split: int = 7) -> None:
        """Script a stream of these text pieces, CRLF line ends, cut into ``split``-byte chunks."""
        raw = (
            b": hello\r\n\r\n"
            + b"".join(
                b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}).encode() + b"\r\n\r\n"
                for p in pieces
            )
            + tail
        )
        self.chunks = [raw[i : i + split] for i in range(0, len(raw), split)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake():
    f = FakeMaster()
    yield f
    f.close()


def make_window(qtbot, target: ChatTarget | None, show: bool = True) -> ChatWindow:
    w = ChatWindow(target)
    qtbot.addWidget(w)
    if show:
        w.show()
    return w


def ask_and_wait(qtbot, w: ChatWindow, text: str, timeout: int = 60_000) -> str:
    with qtbot.waitSignal(w.answer_finished, timeout=timeout, raising=True) as sig:
        assert w.ask(text)
    return sig.args[0]


def greedy_reference(master: RealMaster, messages: list[dict], max_tokens: int) -> str:
    body = {"model": master.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    status, data = http_json(master.url + "/v1/chat/completions", body)
    assert status == 200, data
    return data["choices"][0]["message"]["content"]


# =========================================================================== against the real master


@pytest.mark.slow
def test_streamed_answer_arrives_token_by_token_and_equals_the_non_streamed_one(qtbot, master):
    w = make_window(qtbot, ChatTarget(master.url))
    assert w.windowTitle() == "MoLink chat"
    w.max_tokens = 40
    w.extra_body = {"temperature": 0, "ignore_eos": True}
    tokens: list[str] = []
    seen_partial: list[bool] = []
    w.token_received.connect(tokens.append)
    w.token_received.connect(lambda _t: seen_partial.append(w.is_busy()))
    answer = ask_and_wait(qtbot, w, "the group of friends")
    assert len(tokens) > 5 and "".join(tokens) == answer
    assert all(seen_partial)  # every token arrived while the answer was still being written
    assert answer == greedy_reference(master, [{"role": "user", "content": "the group of friends"}], 40)
    assert w.history == (Turn("user", "the group of friends"), Turn("assistant", answer))
    assert not w.is_busy() and w.send_button.isEnabled() and not w.stop_button.isEnabled()
    qtbot.waitUntil(lambda: "served by 1 PC" in w.status_label.text(), timeout=10_000)
    status = w.status_label.text()
    assert f"Model: {master.model}" in status and "tokens/s" in status
    assert "the group of friends" in w.transcript.toPlainText()


@pytest.mark.slow
def test_second_turn_sends_the_whole_history(qtbot, master):
    w = make_window(qtbot, ChatTarget(master.url))
    w.max_tokens = 12
    w.extra_body = {"temperature": 0, "ignore_eos": True}
    first = ask_and_wait(qtbot, w, "layers are cut")
    second = ask_and_wait(qtbot, w, "into ranges")
    expected = [
        {"role": "user", "content": "layers are cut"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "into ranges"},
    ]
    assert w.last_request_body is not None and w.last_request_body["messages"] == expected
    assert w.last_request_body["stream"] is True and w.last_request_body["model"] == master.model
    assert second == greedy_reference(master, expected, 12)  # the master answered the whole conversation
    assert len(w.history) == 4


@pytest.mark.slow
def test_stop_ends_the_stream_and_the_master_cancels_the_request(qtbot, master):
    w = make_window(qtbot, ChatTarget(master.url))
    long = CONTEXT - 32
    w.max_tokens = long
    w.extra_body = {"temperature": 0, "ignore_eos": True}
    before = master.health()["tokens_generated"]
    tokens: list[str] = []

    def on_token(t: str) -> None:
        tokens.append(t)
        if len(tokens) == 3:
            w.stop()

    w.token_received.connect(on_token)
    with qtbot.waitSignal(w.stopped, timeout=60_000) as sig:
        assert w.ask("every machine runs a worker")
    partial = sig.args[0]
    assert partial == "".join(tokens) and len(tokens) == 3
    assert not w.is_busy() and not w.stop_button.isEnabled() and w.send_button.isEnabled()
    assert "(stopped)" in w.transcript.toPlainText()
    assert w.history[-1] == Turn("assistant", partial)
    deadline = time.monotonic() + 5
    while (h := master.health())["running"] != 0:
        assert time.monotonic() < deadline, f"the master still runs the stopped request: {h}"
        time.sleep(0.05)
    assert h["tokens_generated"] - before < long, "the request ran to its end: it was not cancelled"
    # the conversation goes on
    w.max_tokens = 8
    assert ask_and_wait(qtbot, w, "next")


@pytest.mark.slow
def test_disabled_with_reason_when_unreachable_then_enabled_when_the_group_serves(qtbot, master):
    closed = free_port()
    w = make_window(qtbot, ChatTarget(f"http://127.0.0.1:{closed}"))
    qtbot.waitUntil(lambda: not w.input.isEnabled(), timeout=10_000)
    reason = w.reason_label.text()
    assert w.reason_label.isVisible() and not w.send_button.isEnabled()
    assert reason.lower().startswith(f"cannot reach the master at http://127.0.0.1:{closed}") and "\n" not in reason
    with qtbot.waitSignal(w.failed, timeout=2000) as sig:
        assert w.ask("hello") is False
    assert sig.args[0] == reason
    w.set_target(ChatTarget(master.url))
    qtbot.waitUntil(lambda: w.input.isEnabled() and w.send_button.isEnabled(), timeout=10_000)
    assert not w.reason_label.isVisible()
    qtbot.waitUntil(lambda: "served by 1 PC" in w.status_label.text(), timeout=10_000)


@pytest.mark.slow
def test_http_error_is_one_sentence_and_the_chat_stays_usable(qtbot, master):
    w = make_window(qtbot, ChatTarget(master.url))
    w.max_tokens = 100_000
    with qtbot.waitSignal(w.failed, timeout=30_000) as sig:
        assert w.ask("too long please")
    why = sig.args[0]
    assert why.startswith("The master refused the request (HTTP 400):") and "max_tokens" in why
    assert "\n" not in why and "Traceback" not in why and why.endswith(".")
    assert w.error_label.isVisible() and w.error_label.text() == why
    assert w.history == () and w.input.toPlainText() == "too long please"  # the question is back for a retry
    assert not w.is_busy() and w.send_button.isEnabled()
    w.max_tokens = 8
    w.extra_body = {"temperature": 0, "ignore_eos": True}
    assert ask_and_wait(qtbot, w, "again")
    assert not w.error_label.isVisible()


def test_connection_refused_on_send_is_one_sentence(qtbot):
    closed = free_port()
    w = make_window(qtbot, ChatTarget(f"http://127.0.0.1:{closed}"), show=False)  # hidden: no health poll decided yet
    with qtbot.waitSignal(w.failed, timeout=10_000) as sig:
        assert w.ask("anyone there?")
    assert sig.args[0] == f"Cannot reach the master at http://127.0.0.1:{closed} (connection refused)."
    assert not w.is_busy() and w.history == ()


# =========================================================================== scripted streams


def bold_fragments(w: ChatWindow) -> list[str]:
    out = []
    block = w.transcript.document().begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            frag = it.fragment()
            if frag.charFormat().fontWeight() >= QFont.Weight.Bold:
                out.append(frag.text())
            it += 1
        block = block.next()
    return out


def test_markdown_is_rendered_and_the_key_is_sent(qtbot, fake):
    fake.stream(["Here is ", "**bo", "ld** text", " and a list:\n\n", "- one\n", "- two\n"])
    w = make_window(qtbot, ChatTarget(fake.url, "sekret"))
    qtbot.waitUntil(lambda: "served by 2 PCs" in w.status_label.text(), timeout=10_000)
    answer = ask_and_wait(qtbot, w, "show me *markdown*", timeout=20_000)
    assert answer == "Here is **bold** text and a list:\n\n- one\n- two\n"
    assert "bold" in bold_fragments(w) and "**" not in w.transcript.toPlainText()
    doc = w.transcript.document()
    lists = [b.text() for b in _blocks(doc) if b.textList() is not None]
    assert lists == ["one", "two"]
    headers, body = fake.requests[-1]
    assert headers["authorization"] == "Bearer sekret" and body["model"] == "fake"
    assert body["messages"] == [{"role": "user", "content": "show me *markdown*"}]


def _blocks(doc):
    block = doc.begin()
    while block.isValid():
        yield block
        block = block.next()


def test_an_answer_cannot_make_the_window_read_local_files(qtbot, fake, tmp_path):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QColor, QImage, QTextDocument

    picture = QImage(20, 20, QImage.Format.Format_RGB32)
    picture.fill(QColor("red"))
    url = QUrl.fromLocalFile(str(tmp_path / "secret.png"))
    assert picture.save(url.toLocalFile())
    fake.stream([f"look ![x]({url.toString()})"])
    w = make_window(qtbot, ChatTarget(fake.url))
    ask_and_wait(qtbot, w, "q", timeout=20_000)
    w.transcript.document().documentLayout().documentSize()  # lay out: images are loaded now
    loaded = w.transcript.document().resource(QTextDocument.ResourceType.ImageResource, url)
    assert loaded is not None and loaded.size().width() <= 1


def test_copy_puts_markdown_on_the_clipboard(qtbot, fake):
    fake.stream(["A **bold**", " answer."])
    w = make_window(qtbot, ChatTarget(fake.url))
    ask_and_wait(qtbot, w, "question one", timeout=20_000)
    QGuiApplication.clipboard().setText("")
    qtbot.mouseClick(w.copy_button, Qt.MouseButton.LeftButton)
    text = QGuiApplication.clipboard().text()
    assert "question one" in text and "A **bold** answer." in text
    assert text.index("question one") < text.index("A **bold**")
    assert w.copy_markdown(last_only=True) == "A **bold** answer."
    assert QGuiApplication.clipboard().text() == "A **bold** answer."


def test_stream_error_and_cut_off_stream_are_sentences(qtbot, fake):
    w = make_window(qtbot, ChatTarget(fake.url))
    err = {"error": {"message": "the request failed in the pipeline: stage 1 left", "type": "service_unavailable"}}
    fake.stream(["par", "tial"], tail=b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
    with qtbot.waitSignal(w.failed, timeout=20_000) as sig:
        w.ask("q")
    assert sig.args[0] == "The group failed while answering: the request failed in the pipeline: stage 1 left."
    fake.stream(["no", " end"], tail=b"")
    with qtbot.waitSignal(w.failed, timeout=20_000) as sig:
        w.ask("q")
    assert sig.args[0].startswith("The answer was cut off")
    fake.stream(["x"], tail=b"data: {broken\n\n")
    with qtbot.waitSignal(w.failed, timeout=20_000) as sig:
        w.ask("q")
    assert sig.args[0].startswith("The master sent a stream the chat cannot read")
    assert w.history == () and not w.is_busy()
    fake.stream(["fine"])
    assert ask_and_wait(qtbot, w, "q", timeout=20_000) == "fine"


def test_unavailable_group_disables_input_with_the_problem(qtbot, fake):
    problem = "waiting for workers (1 of 2 joined)"
    fake.health = (503, {"status": "unavailable", "problem": problem, "workers": [{"stage": None}]})
    w = make_window(qtbot, ChatTarget(fake.url))
    qtbot.waitUntil(lambda: not w.input.isEnabled(), timeout=10_000)
    assert w.reason_label.text() == "The group cannot answer now: waiting for workers (1 of 2 joined)."
    assert not w.send_button.isEnabled()
    fake.health = (200, {"status": "ok", "problem": None, "workers": [{"stage": 0}]})
    qtbot.waitUntil(lambda: w.input.isEnabled() and w.send_button.isEnabled(), timeout=10_000)  # the next 2 s poll
    assert not w.reason_label.isVisible()


def test_no_target_says_why(qtbot):
    w = make_window(qtbot, None)
    assert not w.input.isEnabled() and not w.send_button.isEnabled()
    assert "No group to chat with" in w.reason_label.text()


def test_enter_sends_and_shift_enter_makes_a_new_line(qtbot, fake):
    fake.stream(["ok"])
    w = make_window(qtbot, ChatTarget(fake.url))
    qtbot.waitUntil(w.send_button.isEnabled, timeout=10_000)
    qtbot.keyClicks(w.input, "line one")
    qtbot.keyClick(w.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(w.input, "line two")
    assert w.input.toPlainText() == "line one\nline two"
    with qtbot.waitSignal(w.answer_finished, timeout=20_000):
        qtbot.keyClick(w.input, Qt.Key.Key_Return)
    assert w.input.toPlainText() == ""
    assert fake.requests[-1][1]["messages"] == [{"role": "user", "content": "line one\nline two"}]
    w.new_chat()
    assert w.history == () and w.transcript.toPlainText() == ""


def test_change_dialog_sets_the_target_and_emits_it(qtbot, fake):
    w = make_window(qtbot, None)
    d = w.open_change_dialog()
    d.address.setText("not a url/with path")
    d.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert d.error.text() and d.isVisible()
    d.address.setText(fake.url.removeprefix("http://"))
    d.api_key.setText("k2")
    with qtbot.waitSignal(w.target_changed, timeout=2000) as sig:
        d.buttons.button(QDialogButtonBox.StandardButton.Ok).click()
    assert sig.args[0] == ChatTarget(fake.url, "k2") and w.target == ChatTarget(fake.url, "k2")
    assert w.target_label.text() == f"Connected to: {fake.url} (with API key)"
    qtbot.waitUntil(w.send_button.isEnabled, timeout=10_000)


@pytest.mark.slow
def test_each_turn_reuses_the_previous_turns_prompt_and_answer_from_the_prefix_cache(qtbot, master):
    """What the window sends turn after turn renders to a prompt that starts with the previous turn's
    prompt and answer tokens, so the group's prefix cache reuses all of it but the last partial
    block (the answer's last token is sampled, never computed, so it is not cached either)."""
    block = 16  # master_core.prefix_cache.BLOCK_TOKENS
    w = make_window(qtbot, ChatTarget(master.url))
    w.max_tokens = 24
    w.extra_body = {"temperature": 0, "ignore_eos": True}
    usages: list[tuple[int, int]] = []
    for question in ("  stages hold ranges of layers\n", "and the master\ttalks to the first", "last turn"):
        ask_and_wait(qtbot, w, question)
        assert w.last_usage is not None
        usages.append(w.last_usage)
    for (prompt, _), (_, cached) in zip(usages, usages[1:]):
        held = prompt + w.max_tokens - 1  # positions with KV on the stages after the previous turn
        assert cached >= held // block * block, (usages, held)
    # the check can fail: the same conversation with its first question altered reuses nothing of it
    assert w.last_request_body is not None
    messages = [dict(m) for m in w.last_request_body["messages"]]
    messages[0]["content"] = "Q: " + messages[0]["content"]
    body = {"model": master.model, "messages": messages, "max_tokens": 1, "temperature": 0}
    status, data = http_json(master.url + "/v1/chat/completions", body)
    assert status == 200, data
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] < block
