"""What `molink chaos` observed and how it is scored (definitions: :mod:`app.tools.chaos.run`).

Contract: pure functions over records: :class:`StreamRecord` (one stream as a client saw it) and
:class:`FaultRecord` (one injected fault and its timings); :func:`compare` aligns a stream with
the fault-free one, :func:`score_faults` / :func:`score_run` / :func:`describe_run` compute the
report's figures, :func:`format_table` prints it.  No I/O but reading a log file to count lines.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .group import HealthLog
from .options import FaultKind


@dataclass
class StreamRecord:
    index: int
    sent_at: float = 0.0  # seconds (time.monotonic)
    tokens: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # arrival of each token
    finish: str | None = None
    error: str | None = None
    ended_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.finish is not None and self.error is None

    def longest_pause(self) -> float:
        return max(self.first_token(), self.longest_gap())

    def first_token(self) -> float:
        """Seconds from sending to the first token (0 without one)."""
        return self.times[0] - self.sent_at if self.times else 0.0

    def longest_gap(self) -> float:
        """The longest gap between two tokens (the stream stopping once it had begun)."""
        return self.longest_gap_from()[0]

    def longest_gap_from(self) -> tuple[float, float | None]:
        """(the longest gap between two tokens, when it began; None without such a gap)."""
        return max(((b - a, a) for a, b in zip(self.times, self.times[1:])), default=(0.0, None))


# --------------------------------------------------------------------------- faults


@dataclass
class FaultRecord:
    kind: str
    worker: str
    at: float  # time.monotonic of the fault
    epoch_before: int
    ended_at: float | None = None  # thawed / reconnected / restarted
    rejoined_at: float | None = None  # serving, every worker connected again
    detect: float | None = None  # seconds
    recover: float | None = None  # seconds; None: no affected stream, or one never recovered
    pause: float | None = None  # seconds: the longest token gap of an affected stream around the fault
    pause_from: float | None = None  # seconds from the fault to that gap's start (< 0: it began before the fault)
    pause_first_token: bool | None = None  # that gap was a stream's wait for its first token
    affected: int = 0
    unrecovered: int = 0
    epoch_changes: int = 0
    problem: str | None = None
    # positions of the open requests a standby member's copy of the caches lacked at the fault
    # (master_core.shadow; None: no member copied); what a repair onto it must still compute
    copy_behind: int | None = None
    copy_wait: float | None = None  # seconds waited before the fault for that copy to catch up


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Diff:
    identical: bool
    lost: int
    duplicated: int
    wrong: int
    first_divergence: int | None


def compare(reference: list[str], got: list[str]) -> Diff:
    """Align a stream's tokens with the fault-free ones (see the module docstring)."""
    if got == reference:
        return Diff(True, 0, 0, 0, None)
    lost = duplicated = wrong = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, reference, got, autojunk=False).get_opcodes():
        if tag == "delete":
            lost += i2 - i1
        elif tag == "insert":
            if _repeats(got[j1:j2], got[:j1]):
                duplicated += j2 - j1
            else:
                wrong += j2 - j1
        elif tag == "replace":
            lost += i2 - i1
            wrong += j2 - j1
    first = next((k for k, (a, b) in enumerate(zip(reference, got)) if a != b), min(len(reference), len(got)))
    return Diff(False, lost, duplicated, wrong, first)


def _repeats(block: list[str], before: list[str]) -> bool:
    n = len(block)
    return any(before[k : k + n] == block for k in range(len(before) - n + 1))


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50, p95 (nearest rank) and max; None for an empty list."""
    s = sorted(xs)
    if not s:
        return {"p50": None, "p95": None, "max": None, "n": 0}

    def rank(p: float) -> float:
        return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3)

    return {"p50": rank(50), "p95": rank(95), "max": round(s[-1], 3), "n": len(s)}


def score_faults(faults: list[FaultRecord], streams: list[StreamRecord], health: HealthLog, end: float) -> None:
    for k, f in enumerate(faults):
        until = faults[k + 1].at if k + 1 < len(faults) else end
        seen = health.first_noticed(f.at, f.epoch_before, f.worker, until)
        f.detect = None if seen is None else round(seen - f.at, 3)
        f.epoch_changes = health.epochs_between(f.at, f.rejoined_at or until)
        open_then = [s for s in streams if s.sent_at < f.at and (s.ended_at is None or s.ended_at > f.at)]
        waits, pauses = [], []
        window_end = f.rejoined_at or until
        for s in open_then:
            nxt = next((t for t in s.times if t > f.at), None)
            if nxt is None:
                if s.completed:
                    continue  # every token was out before the fault; only the end was on its way
                f.affected += 1
                f.unrecovered += 1
                continue
            f.affected += 1
            waits.append(nxt - f.at)
            stamps = [s.sent_at, *s.times]
            gaps = enumerate(zip(stamps, stamps[1:]))
            pauses += [(b - a, a - f.at, i == 0) for i, (a, b) in gaps if b > f.at and a <= window_end]
        f.recover = round(max(waits), 3) if waits and not f.unrecovered else None
        if pauses:
            longest, began, first = max(pauses)
            f.pause, f.pause_from, f.pause_first_token = round(longest, 3), round(began, 3), first


def score_run(reference: list[StreamRecord], run: list[StreamRecord]) -> dict:
    completed = [r for r in run if r.completed]
    totals = {"lost": 0, "duplicated": 0, "wrong": 0, "undelivered": 0}
    differ, details = 0, []
    for ref, got in zip(reference, run):
        if not ref.completed:
            continue  # nothing to compare with
        if got.completed:
            d = compare(ref.tokens, got.tokens)
        else:
            d = compare(ref.tokens[: len(got.tokens)], got.tokens)
            totals["undelivered"] += max(0, len(ref.tokens) - len(got.tokens))
        totals["lost"] += d.lost
        totals["duplicated"] += d.duplicated
        totals["wrong"] += d.wrong
        if not d.identical or not got.completed:
            differ += not d.identical
            details.append(
                {
                    "index": got.index,
                    "completed": got.completed,
                    "error": got.error,
                    "tokens_expected": len(ref.tokens),
                    "tokens_received": len(got.tokens),
                    "identical_prefix": d.identical,
                    "first_divergence": d.first_divergence,
                    "lost": d.lost,
                    "duplicated": d.duplicated,
                    "wrong": d.wrong,
                }
            )
    return {
        "requests": len(run),
        "completed": len(completed),
        "failed": len(run) - len(completed),
        "compared": sum(1 for r in reference if r.completed),
        "streams_differing": differ,
        "tokens_lost": totals["lost"],
        "tokens_duplicated": totals["duplicated"],
        "tokens_wrong": totals["wrong"],
        "tokens_undelivered_by_failed": totals["undelivered"],
        "tokens_received": sum(len(r.tokens) for r in run),
        "errors": sorted({(r.error or "")[:120] for r in run if r.error}),
        "details": details[:50],
    }


def describe_run(run: list[StreamRecord], start: float | None = None) -> dict:
    """A run's figures; times ``_at`` in seconds from ``start`` (default: its first request), the
    clock of the faults' ``at``."""
    t0 = min(r.sent_at for r in run)
    t1 = max(r.ended_at or r.sent_at for r in run)
    tokens = sum(len(r.tokens) for r in run)
    gap, began = max((r.longest_gap_from() for r in run), key=lambda g: g[0])
    return {
        "seconds": round(t1 - t0, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(t1 - t0, 1e-9), 2),
        "longest_pause": round(max(r.longest_pause() for r in run), 3),
        "longest_first_token": round(max(r.first_token() for r in run), 3),
        "first_token": percentiles([r.first_token() for r in run if r.times]),
        "longest_gap_between_tokens": round(gap, 3),
        "longest_gap_between_tokens_at": None if began is None else round(began - (t0 if start is None else start), 3),
        "completed": sum(r.completed for r in run),
        "failed": sum(not r.completed for r in run),
    }


_LOG_PATTERNS = {
    "epochs_served": re.compile(r"serving epoch \d+"),
    "steps_failed": re.compile(r"step failed"),
    "requests_failed": re.compile(r"request \d+ failed"),
    "lanes_crashed": re.compile(r"lane \d+ crashed"),
    "workers_left": re.compile(r"worker \S+ left:"),
}


def count_log(path: Path) -> dict[str, int]:
    """How often the master logged each of a few events (its INFO log)."""
    counts = dict.fromkeys(_LOG_PATTERNS, 0)
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        for line in f:
            for name, pattern in _LOG_PATTERNS.items():
                counts[name] += bool(pattern.search(line))
    return counts


DEFINITIONS = {
    "detect": "seconds from the fault to the first /health sample with a higher epoch",
    "recover": "seconds from the fault until every stream open at the fault received its next token",
    "rejoined": "seconds from the fault until /health shows the group serving with every worker connected",
    "tokens_lost": "fault-free tokens missing from completed streams (alignment)",
    "tokens_duplicated": "extra tokens in completed streams that repeat the stream's earlier tokens",
    "streams_differing": "requests whose received tokens differ from the fault-free run's",
    "longest_pause": "longest gap between two tokens of one stream (from sending, for the first)",
    "longest_first_token": "longest wait of a stream for its first token, from sending (a part of longest_pause)",
    "first_token": "the streams' waits for their first token, from sending: p50, p95 (nearest rank), max, count",
    "longest_gap_between_tokens": "longest gap between two tokens of one stream once it began (the other part)",
    "longest_gap_between_tokens_at": "seconds from the run's start (the faults' clock) to the start of that gap",
    "pause": "per fault: the longest token gap of a stream open at the fault, among gaps ending after the fault "
    "and starting before the worker rejoined",
    "pause_from": "per fault: seconds from the fault to the start of that longest gap (negative: before the fault; "
    "a gap that starts seconds after the fault belongs to the worker's return, not to its loss)",
    "pause_first_token": "per fault: whether that longest gap was a stream's wait for its first token",
    "copy_behind": "per fault: positions of the open requests a standby member's copy of the caches lacked at the "
    "fault (null: no member copied); a repair onto that member computes those",
    "copy_wait": "per fault: seconds the tool waited before the fault (at most --settle-timeout) for a standby "
    "member's copy to catch up, where a member stood by",
}


def fault_row(f: FaultRecord, start: float) -> dict:
    """A fault as JSON: times in seconds, ``at`` from the start of the faulty run, the rest from the fault."""
    row = asdict(f)
    row.update(
        at=round(f.at - start, 3),
        ended_at=None if f.ended_at is None else round(f.ended_at - f.at, 3),
        rejoined_at=None if f.rejoined_at is None else round(f.rejoined_at - f.at, 3),
    )
    return row


def fault_summary(faults: list[FaultRecord]) -> dict:
    def block(fs: list[FaultRecord]) -> dict:
        return {
            "faults": len(fs),
            "detect": percentiles([f.detect for f in fs if f.detect is not None]),
            "not_detected": sum(f.detect is None for f in fs),
            "recover": percentiles([f.recover for f in fs if f.recover is not None]),
            "pause": percentiles([f.pause for f in fs if f.pause is not None]),
            "not_recovered": sum(f.unrecovered for f in fs),
            "rejoined": percentiles([f.rejoined_at - f.at for f in fs if f.rejoined_at is not None]),
            "epoch_changes": sum(f.epoch_changes for f in fs),
        }

    out = {"all": block(faults)}
    for kind in FaultKind:
        fs = [f for f in faults if f.kind == kind.value]
        if fs:
            out[kind.value] = block(fs)
    return out


def _fmt(x: float | None, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def format_table(report: dict) -> str:
    ff, fr = report["fault_free_run"], report["faulty_run"]
    rss, cfg = report["master_rss_bytes"], report["config"]
    mb = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [
        f"molink chaos: {report['model']}, {cfg['workers']} workers (serving with >= {cfg['min_workers']}), "
        f"{fr['requests']} requests x 2 runs, {cfg['concurrency']} at once",
        "",
        f"{'':<34}{'fault-free':>14}{'with faults':>14}",
        f"{'requests completed':<34}{ff['completed']:>14}{fr['completed']:>14}",
        f"{'requests failed':<34}{ff['failed']:>14}{fr['failed']:>14}",
        f"{'tokens received':<34}{ff['tokens']:>14}{fr['tokens_received']:>14}",
        f"{'run time':<34}{_fmt(ff['seconds']):>14}{_fmt(fr['seconds']):>14}",
        f"{'longest pause in a stream':<34}{_fmt(ff['longest_pause']):>14}{_fmt(fr['longest_pause']):>14}",
        f"{'  of which, a first token':<34}{_fmt(ff['longest_first_token']):>14}{_fmt(fr['longest_first_token']):>14}",
        f"{'  between two tokens':<34}{_fmt(ff['longest_gap_between_tokens']):>14}"
        f"{_fmt(fr['longest_gap_between_tokens']):>14}",
        "",
        f"{'streams differing from fault-free':<34}{fr['streams_differing']:>14}",
        f"{'tokens lost':<34}{fr['tokens_lost']:>14}",
        f"{'tokens duplicated':<34}{fr['tokens_duplicated']:>14}",
        f"{'tokens wrong (other differences)':<34}{fr['tokens_wrong']:>14}",
        "",
        f"{'faults':<8}{'n':>3}{'detect p50/p95/max':>22}{'recover p50/p95/max':>24}{'pause max':>11}"
        f"{'rejoined max':>15}{'epochs':>8}",
    ]
    for name, b in report["summary"].items():
        d, r, f = b["detect"], b["recover"], b["rejoined"]
        det = f"{_fmt(d['p50'], '')}/{_fmt(d['p95'], '')}/{_fmt(d['max'])}"
        rec = f"{_fmt(r['p50'], '')}/{_fmt(r['p95'], '')}/{_fmt(r['max'])}"
        cells = f"{det:>22}{rec:>24}{_fmt(b['pause']['max']):>11}{_fmt(f['max']):>15}{b['epoch_changes']:>8}"
        lines.append(f"{name:<8}{b['faults']:>3}{cells}")
        if b["not_detected"] or b["not_recovered"]:
            lines.append(f"{'':<14}not detected: {b['not_detected']}, streams never recovered: {b['not_recovered']}")
    lines += [
        "",
        f"master RSS: {mb(rss['before'])} before, {mb(rss['after_fault_free_run'])} after the fault-free run, "
        f"{mb(rss['after_faulty_run'])} after the faulty run",
        "caches left on workers (requests with a KV cache, at the end): "
        + ", ".join(
            f"{name} {n if n is not None else 'no report'}" for name, n in report["caches_left_on_workers"].items()
        )
        + f" (the master keeps {report.get('cached_prefixes', 0)} of them on every stage as cached prefixes)",
    ]
    return "\n".join(lines)
