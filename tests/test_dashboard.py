"""The dashboard in a real headless Chromium against a master with 3 workers; /metrics."""

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest
from harness import Cluster, greedy, run
from tiny_models import make_tiny_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


async def chromium(url: str, profile: Path, *extra: str, timeout: float = 90) -> str:
    """Load ``url`` in headless Chromium, let its scripts run, return stdout (e.g. the DOM)."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium; .ci/run does this)")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=6000",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode(errors="replace")


async def capture(url: str, profile: Path, png: Path) -> None:
    await chromium(url, profile, f"--screenshot={png}", "--window-size=1280,1100")


async def exercise(c: Cluster) -> None:
    """Some traffic, so the charts and counters have something to show."""
    for _ in range(3):
        await asyncio.gather(*(c.engine.generate([5 + i, 6, 7, 8] * (1 + i), greedy(12)) for i in range(4)))
        c.master.dashboard.sample()


@pytest.mark.slow
def test_dashboard_in_chromium_shows_members_and_layers(tmp_path):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=6, seed=4)

    async def main():
        async with Cluster(ckpt, workers=3) as c:
            await exercise(c)
            url = c.master.dashboard_url
            dom = await chromium(url, tmp_path / "profile", "--dump-dom")
            png = tmp_path / "dashboard.png"
            await capture(url, tmp_path / "profile2", png)
            async with aiohttp.ClientSession() as http, http.get(c.base_url + "/metrics") as r:
                metrics = await r.text()
            return dom, png, metrics, c.master.group.describe()

    dom, png, metrics, members = run(main())
    for m in members:
        assert m["name"] in dom
        a, b = m["layers"]
        assert f"[{a}, {b})" in dom  # members table
        assert f"layers {a}–{b - 1}" in dom  # pipeline picture
    assert "serving" in dom and "disconnected" not in dom
    # each member's path to the master (all three tunnels come from 127.0.0.1 here)
    assert dom.count('reaches the master; the round trip and bandwidth it measured">this PC') == 3, dom
    assert dom.count("<span>direct hop</span>") == 2  # both inner hops of the pipeline picture go stage to stage
    assert "<span>tokens loop back</span>" in dom  # and the last stage feeds the first directly
    assert sum(bool(m["next_hop"]) and m["next_hop"].startswith("direct") for m in members) == 2
    assert png.exists() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "molink_generated_tokens_total 144.0" in metrics
    assert "molink_pipeline_stages 3.0" in metrics
    assert "molink_cached_prompt_tokens_total" in metrics and "molink_prompt_tokens_total" in metrics
    assert "prompt cache " in dom  # the share of prompt tokens reused from the prefix cache
    assert "molink_time_to_first_token_seconds_count 12.0" in metrics


def test_dashboard_refuses_without_token_or_with_foreign_host(tmp_path):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "llama", num_layers=3, seed=4)

    async def main():
        async with Cluster(ckpt, workers=1) as c:
            dom = await chromium(f"http://127.0.0.1:{c.master.port}/dashboard", tmp_path / "p", "--dump-dom")
            async with aiohttp.ClientSession() as http:
                url = c.master.dashboard_url
                async with http.get(url) as r:
                    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
                    assert r.headers["X-Frame-Options"] == "DENY"
                async with http.get(url, headers={"Host": f"attacker.example:{c.master.port}"}) as r:
                    assert r.status == 421
                async with http.get(
                    url.replace("/dashboard?", "/dashboard/api/state?"), headers={"Origin": "http://attacker.example"}
                ) as r:
                    assert r.status == 403
                # the step timelines: where a slow stream's time went (needs the token like the rest)
                await c.engine.generate([5, 6, 7, 8], greedy(6))
                steps_url = f"http://127.0.0.1:{c.master.port}/dashboard/api/steps"
                async with http.get(steps_url) as r:
                    assert r.status == 401
                async with http.get(steps_url, headers={"X-MoLink-Token": c.master.dashboard_token}) as r:
                    assert r.status == 200
                    got = await r.json()
            steps = got["steps"]
            assert sum(s["prefill_tokens"] for s in steps) >= 4 and sum(s["decodes"] for s in steps) >= 5
            assert all(s["began"] <= s["ended"] <= got["now"] and len(s["computes"]) == 1 for s in steps)
            # and the cost model's fit the scheduler planned with (measured by the start-up profile)
            assert len(got["costs"]["stage_per_token"]) == 1 and got["costs"]["hidden_bytes_per_token"] > 0
            return dom

    assert "dashboard needs the link" in run(main())


if __name__ == "__main__":  # refresh docs/dashboard.png: python tests/test_dashboard.py
    import tempfile

    async def shot():
        tmp = Path(tempfile.mkdtemp())
        async with Cluster("default", workers=3) as c:
            for _ in range(4):
                await asyncio.gather(
                    *(
                        c.engine.generate(c.engine.tokenizer("Tell me a story about " + w)["input_ids"], greedy(24))
                        for w in ("a cat", "the sea", "a robot")
                    )
                )
                c.master.dashboard.sample()
                await asyncio.sleep(1)
            await capture(
                c.master.dashboard_url,
                tmp / "profile",
                Path(__file__).resolve().parent.parent / "docs" / "dashboard.png",
            )

    run(shot())
    sys.exit(0)
