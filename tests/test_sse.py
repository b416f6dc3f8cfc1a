"""The incremental SSE parser of the chat window (pure: no Qt, no network)."""

from __future__ import annotations

import json
import random

import pytest

from app.desktop.sse import DataEvent, DoneEvent, ErrorEvent, SseParser, parse_data

STREAM = (
    b": keep-alive\n\n"
    b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "lo \xc3\xa9t\xc3\xa9 \xe2\x9c\x93"}}]}\n\n'
    b"event: message\nid: 7\nretry: 100\n"
    b'data: {"choices": [],\ndata:  "usage": {"completion_tokens": 2}}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    DataEvent({"choices": [{"delta": {"content": "Hel"}}]}),
    DataEvent({"choices": [{"delta": {"content": "lo été ✓"}}]}),
    DataEvent({"choices": [], "usage": {"completion_tokens": 2}}),
    DoneEvent(),
]


def feed_all(parser: SseParser, chunks: list[bytes]) -> list:
    out = []
    for c in chunks:
        out.extend(parser.feed(c))
    return out


def test_whole_stream_in_one_chunk():
    p = SseParser()
    assert p.feed(STREAM) == EXPECTED
    assert p.close() is False


def test_every_split_point_gives_the_same_events():
    for cut in range(len(STREAM) + 1):
        assert feed_all(SseParser(), [STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut


def test_byte_by_byte_and_random_chunks():
    assert feed_all(SseParser(), [STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED
    rng = random.Random(1)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(STREAM)), 6))
        chunks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
        assert feed_all(SseParser(), chunks) == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(eol):
    stream = STREAM.replace(b"\n", eol)
    assert SseParser().feed(stream) == EXPECTED
    # a CRLF pair cut between two chunks is one line end, not two (which would dispatch early)
    for cut in range(len(stream) + 1):
        assert feed_all(SseParser(), [stream[:cut], stream[cut:]]) == EXPECTED, cut


def test_events_are_returned_only_when_complete():
    p = SseParser()
    assert p.feed(b'data: {"a": 1}') == []
    assert p.feed(b"\n") == []
    assert p.feed(b"\n") == [DataEvent({"a": 1})]


def test_malformed_data_is_an_error_event_and_the_stream_goes_on():
    p = SseParser()
    events = p.feed(b'data: {not json\n\ndata: [1, 2]\n\ndata: \xff\xfe\n\ndata: {"ok": true}\n\ndata: [DONE]\n\n')
    assert [type(e) for e in events] == [ErrorEvent, ErrorEvent, ErrorEvent, DataEvent, DoneEvent]
    assert "not JSON" in events[0].message
    assert "list" in events[1].message
    assert "UTF-8" in events[2].message
    assert events[3] == DataEvent({"ok": True})


def test_over_long_line_is_an_error_and_skipped():
    p = SseParser(max_line=64)
    big = b"data: " + b"x" * 200
    events = feed_all(p, [big[:100], big[100:], b"\n\n", b'data: {"b": 2}\n\n'])
    assert isinstance(events[0], ErrorEvent) and "longer than 64" in events[0].message
    assert events[1:] == [DataEvent({"b": 2})]


def test_comments_other_fields_and_empty_events_dispatch_nothing():
    p = SseParser()
    assert p.feed(b": ping\n\nevent: x\nid: 3\n\n\n\nretry: 5\n\n") == []


def test_no_space_after_colon_and_done_marker():
    assert SseParser().feed(b'data:{"x":1}\n\ndata:[DONE]\n\n') == [DataEvent({"x": 1}), DoneEvent()]


def test_close_drops_an_unterminated_event():
    p = SseParser()
    assert p.feed(b'data: {"a": 1}\n') == []
    assert p.close() is True
    assert p.feed(b"\n") == []  # nothing pending any more
    assert p.close() is False


def test_parse_data_never_raises():
    deep = "[" * 100_000
    assert isinstance(parse_data(deep), ErrorEvent)
    assert parse_data(" [DONE] ") == DoneEvent()
    assert parse_data(json.dumps({"k": "v"})) == DataEvent({"k": "v"})


def test_garbage_never_raises():
    rng = random.Random(7)
    for _ in range(200):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        p = SseParser(max_line=50)
        for e in p.feed(blob) + p.feed(b"\n\n"):
            assert isinstance(e, (DataEvent, DoneEvent, ErrorEvent))
        p.close()
