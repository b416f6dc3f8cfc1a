// MoLink dashboard: polls /dashboard/api/state once a second and redraws. No dependencies.
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 1) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d));
const gb = (b) => (b / 1e9).toFixed(1) + " GB";

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function drawChart(canvas, values, color, scale = 1) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const pts = values.map((v, i) => [i, v === null ? null : v * scale]);
  const ys = pts.filter((p) => p[1] !== null).map((p) => p[1]);
  const max = Math.max(1e-9, ...ys, 0) * 1.15 || 1;
  ctx.strokeStyle = "#1f2937"; ctx.fillStyle = "#9ca3af"; ctx.font = "11px system-ui";
  for (let k = 0; k <= 2; k++) {
    const y = h - pad + (-(h - 2 * pad) * k) / 2;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 4, y); ctx.stroke();
    ctx.fillText(fmt((max * k) / 2, max < 10 ? 2 : 0), 2, y + 4);
  }
  if (!ys.length) { ctx.fillText("no data yet", w / 2 - 30, h / 2); return; }
  const n = Math.max(2, pts.length);
  ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
  let started = false;
  pts.forEach(([i, v]) => {
    if (v === null) return;
    const x = pad + ((w - pad - 4) * i) / (n - 1), y = h - pad - ((h - 2 * pad) * v) / max;
    if (!started) { ctx.moveTo(x, y); started = true; } else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function render(s) {
  $("model").textContent = s.model;
  const st = $("status");
  st.textContent = s.status + " · epoch " + s.epoch;
  st.className = "badge " + (s.status === "serving" ? "ok" : "bad");
  $("problem").textContent = s.problem || "";
  const hits = s.totals.cache_hit_rate;
  const cached = hits === null || hits === undefined ? "" : ` · prompt cache ${Math.round(hits * 100)}%`;
  $("totals").textContent = `${s.totals.tokens} tokens · ${s.totals.requests} requests${cached}`;

  const pipe = $("pipeline");
  pipe.replaceChildren();
  if (s.pipeline.length) {
    pipe.append(el("div", { class: "stage master" }, el("div", { class: "name" }, "master"), el("div", { class: "muted" }, "tokens in, logits out")));
    s.pipeline.forEach((p, i) => {
      const direct = p.hop_in && p.hop_in.startsWith("direct");
      pipe.append(el("div", { class: "link" + (direct ? " direct" : ""), title: p.hop_in || "from the master" },
        el("span", { class: "arrow" }, direct ? "⇢" : "⟶"),
        el("span", {}, p.hop_in ? (direct ? "direct hop" : "via master") : "from master"),
        ...(direct ? [] : [el("span", {}, `${fmt(p.rtt_ms)} ms RTT`), el("span", {}, `${fmt(p.mbps)} Mbit/s`)])));
      pipe.append(el("div", { class: "stage", "data-stage": i },
        el("div", { class: "name" }, p.name),
        el("div", { class: "layers" }, `layers ${p.layers[0]}–${p.layers[1] - 1}`),
        el("div", { class: "muted" }, `${fmt(p.compute_ms)} ms / step`)));
    });
    if (s.loop_back) {
      const back = s.loop_back.startsWith("direct");
      pipe.append(el("div", { class: "link" + (back ? " direct" : ""), title: "last stage → first stage: " + s.loop_back },
        el("span", { class: "arrow" }, "↩"),
        el("span", {}, back ? "tokens loop back" : "master drives each step")));
    }
  } else pipe.append(el("p", { class: "muted" }, "no stages yet"));

  const mb = $("members").tBodies[0];
  mb.replaceChildren(...s.members.map((m) => el("tr", {},
    el("td", {}, m.name),
    el("td", {}, `${m.device_name} (${m.device}${m.compute_capability ? `, compute ${m.compute_capability}, driver ${m.driver}` : ""})`),
    el("td", {}, gb(m.free_memory)), el("td", {}, `${fmt(m.gflops)} GFLOP/s`),
    el("td", { title: "how its tunnel reaches the master; the round trip and bandwidth it measured" },
      [m.path, m.rtt_ms ? `${fmt(m.rtt_ms)} ms` : "", m.link_mbps ? `${fmt(m.link_mbps)} Mbit/s` : ""].filter(Boolean).join(" · ") || "–"),
    el("td", {}, m.state), el("td", { title: m.standby || "" }, m.layers ? `[${m.layers[0]}, ${m.layers[1]})` : (m.standby ? "standby" : "–")),
    el("td", {}, m.weight_bytes ? `${gb(m.weight_bytes)} (${m.precision})` : "–"), el("td", {}, m.steps),
    el("td", {}, m.next_hop || "–"))));

  const series = s.series;
  drawChart($("chart-tps"), series.map((p) => p.tokens_per_s), "#60a5fa");
  drawChart($("chart-ttft"), series.map((p) => p.ttft), "#34d399");
  drawChart($("chart-tpot"), series.map((p) => p.tpot), "#f472b6", 1000);

  const qb = $("queue").tBodies[0];
  qb.replaceChildren(...(s.queue.length ? s.queue.map((q) => el("tr", {}, el("td", {}, q.id), el("td", {}, q.state),
    el("td", {}, q.prompt_tokens), el("td", {}, `${q.output_tokens} / ${q.max_tokens}`))) : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "empty"))]));

  const errs = $("errors");
  errs.replaceChildren(...(s.errors.length ? s.errors.map((e) => el("li", { class: e.level },
    `${new Date(e.at * 1000).toLocaleTimeString()} ${e.source}: ${e.message}`)) : [el("li", { class: "muted" }, "none")]));
}

async function tick() {
  try {
    const r = await fetch("/dashboard/api/state", { headers: { "X-MoLink-Token": token }, cache: "no-store" });
    if (!r.ok) throw new Error((await r.json()).error.message);
    render(await r.json());
  } catch (e) {
    $("status").textContent = "disconnected";
    $("status").className = "badge bad";
    $("problem").textContent = String(e.message || e);
  }
}
tick();
setInterval(tick, 1000);
