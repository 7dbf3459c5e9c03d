// Tidegate dashboard: polls /admin/status.json once a second and updates the page in place
// (cells keep their nodes; only changed text is written), so nothing flickers. On an error
// it says "reconnecting…" and retries with backoff (1 s doubling to 8 s), so the page comes
// back by itself when the gateway restarts.
//
// Every value from the gateway is written as text (textContent, attributes, DOM nodes built
// with createElement): never as HTML, even names the config validates, since app IDs and
// error messages are the user's or operator's text. Keep it that way (a test checks).
//
// With an admin token (server.admin.token_file), open the page once as
// /admin/#token=TOKEN (or answer the prompt): the token is kept in this tab's
// sessionStorage, removed from the address bar, and sent as `Authorization: Bearer` on
// every fetch.
"use strict";

const OUTCOMES = [
  // colour, dash: every series also differs by line style, not colour alone
  { key: "ok", label: "ok", color: "#1a7f37", dash: [] },
  { key: "limited", label: "limited", color: "#9a6700", dash: [8, 4] },
  { key: "shed", label: "shed", color: "#8250df", dash: [2, 3] },
  { key: "degraded", label: "degraded", color: "#0969da", dash: [10, 3, 2, 3] },
  { key: "error", label: "error", color: "#cf222e", dash: [4, 4] },
];
const UPSTREAM_COLORS = ["#0969da", "#bc4c00", "#1a7f37", "#8250df", "#cf222e", "#57606a"];
const HISTORY_MS = 300000;
const MAX_LIMIT_ROWS = 4;
const LEVEL_TEXT = {
  ok: "● OK", warning: "▲ WARN", critical: "■ CRITICAL", limiting: "▲ LIMITING",
  per_key: "○ per key", unlimited: "○ no limit",
};

const $ = (id) => document.getElementById(id);
let delay = 1000;

const TOKEN_KEY = "tidegate-admin-token";
function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!m) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
}
function authHeaders() {
  const t = sessionStorage.getItem(TOKEN_KEY);
  return t ? { Authorization: "Bearer " + t } : {};
}
// Ask for the token when the gateway says one is needed (401): once per page load.
let asked = false;
function askToken() {
  if (asked) return;
  asked = true;
  const t = window.prompt("Admin token (server.admin.token_file):");
  if (t) sessionStorage.setItem(TOKEN_KEY, t.trim());
}

// An element with a class and text.
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function fmtRate(v) {
  if (v == null) return "—";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}
function fmtPct(v) { return v == null ? "—" : (v * 100).toFixed(v < 0.1 ? 2 : 1) + "%"; }
function fmtMs(v) { return v == null ? "—" : v < 10 ? v.toFixed(2) : v.toFixed(1); }
function fmtTime(ms) { return ms ? new Date(ms).toLocaleTimeString() : "—"; }
function fmtLimit(l) {
  const r = l.rate_per_s >= 1 ? fmtRate(l.rate_per_s) + "/s" : (l.rate_per_s * 60).toFixed(1) + "/min";
  return l.key.length ? r + " per " + l.key.join("+") : r;
}

// Set text (and a data-value for scripts and tests) only when it changed.
function setCell(el, text, value) {
  if (el.textContent !== text) el.textContent = text;
  const v = value == null ? "" : String(value);
  if (el.dataset.value !== v) el.dataset.value = v;
}

// Find or create the row `key` in `tbody`, with `cols` cells; rows are kept in `order`.
function row(tbody, key, cols, attrs) {
  let tr = tbody.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.key = key;
    for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
    for (const c of cols) {
      const td = document.createElement(c === "name" ? "th" : "td");
      if (c === "name") td.scope = "row";
      td.dataset.col = c;
      if (!["name", "level", "limit", "util", "target", "rule", "out"].includes(c)) td.className = "num";
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
  tr.dataset.seen = "1";
  return tr;
}
function cell(tr, col) { return tr.querySelector(`[data-col="${col}"]`); }
function sweep(tbody, keys) {
  // Keep rows in document order of `keys`; drop rows that are gone (after a reload).
  for (const tr of [...tbody.children]) if (!keys.includes(tr.dataset.key)) tr.remove();
  for (const k of keys) {
    const tr = tbody.querySelector(`tr[data-key="${CSS.escape(k)}"]`);
    if (tr) tbody.appendChild(tr);
  }
}

function utilCell(td, u, level) {
  if (!td.firstChild) {
    const bar = el("span", "bar");
    bar.appendChild(el("span"));
    td.append(bar, el("span", "pct"));
  }
  const bar = td.querySelector(".bar");
  bar.className = "bar lvl-" + level;
  bar.firstChild.style.width = u == null ? "0" : Math.min(100, u * 100).toFixed(1) + "%";
  setCell(td.querySelector(".pct"), fmtPct(u), u == null ? "" : u.toFixed(4));
  td.dataset.value = u == null ? "" : u.toFixed(4);
}

function renderLevels(s) {
  const tbody = $("levels").tBodies[0];
  const limits = Object.fromEntries(s.limits.map((l) => [l.rule, l]));
  const keys = [];
  const cols = ["name", "level", "limit", "rate", "util", "ok", "limited", "shed", "degraded", "error"];
  for (const itf of s.interfaces) {
    const k = "i:" + itf.name;
    keys.push(k);
    const tr = row(tbody, k, cols, { "data-interface": itf.name });
    setCell(cell(tr, "name"), itf.name);
    const lv = cell(tr, "level");
    if (!lv.firstChild) lv.appendChild(el("span", "badge"));
    lv.firstChild.className = "badge lvl-" + itf.headroom;
    setCell(lv.firstChild, LEVEL_TEXT[itf.headroom] || itf.headroom);
    lv.dataset.value = itf.headroom;
    const own = itf.limit ? limits[itf.limit.rule] : itf.limits.length ? limits[itf.limits[0]] : null;
    setCell(cell(tr, "limit"), own ? fmtLimit(own) : "—", own ? own.rate_per_s : "");
    setCell(cell(tr, "rate"), fmtRate(itf.rates.total), itf.rates.total.toFixed(3));
    utilCell(cell(tr, "util"), itf.utilisation, itf.headroom);
    for (const o of ["ok", "limited", "shed", "degraded", "error"]) {
      setCell(cell(tr, o), fmtRate(itf.rates[o]), itf.rates[o].toFixed(3));
    }
    // One sub-row per limit rule guarding this interface: the busiest few, so a config with
    // a thousand limits stays readable (the rest are in status.json's `limits`).
    const busy = (n) => { const l = limits[n]; return l.allowed_per_s + l.limited_per_s + l.dry_run_limited_per_s; };
    const shown = itf.limits.length <= MAX_LIMIT_ROWS ? itf.limits
      : [...itf.limits].sort((a, b) => busy(b) - busy(a) || a.localeCompare(b)).slice(0, MAX_LIMIT_ROWS);
    for (const name of shown) {
      const l = limits[name];
      const lk = "l:" + itf.name + ":" + name;
      keys.push(lk);
      const lr = row(tbody, lk, cols, { "data-limit": name, "data-for": itf.name, class: "limit" });
      const scope = [l.mode === "dry_run" ? "dry run" : null, l.apps ? "apps " + l.apps.join(",") : null,
        l.partial ? "some users" : null].filter(Boolean).join(", ");
      setCell(cell(lr, "name"), "↳ " + name + (scope ? " (" + scope + ")" : ""));
      const lvl = l.utilisation == null ? (l.limited_per_s > 0 ? "limiting" : "per_key")
        : l.utilisation >= 0.9 ? "critical" : l.utilisation >= 0.7 ? "warning" : "ok";
      setCell(cell(lr, "level"), "");
      setCell(cell(lr, "limit"), fmtLimit(l), l.rate_per_s);
      setCell(cell(lr, "rate"), fmtRate(l.allowed_per_s + l.limited_per_s + l.dry_run_limited_per_s));
      utilCell(cell(lr, "util"), l.utilisation, lvl);
      setCell(cell(lr, "ok"), fmtRate(l.allowed_per_s), l.allowed_per_s.toFixed(3));
      const lim = l.limited_per_s + l.dry_run_limited_per_s;
      setCell(cell(lr, "limited"), fmtRate(lim) + (l.dry_run_limited_per_s > 0 ? " (dry)" : ""), lim.toFixed(3));
      for (const o of ["shed", "degraded", "error"]) setCell(cell(lr, o), "");
    }
  }
  if (s.unclassified.count > 0) {
    keys.push("i:");
    const tr = row(tbody, "i:", cols, { "data-interface": "" });
    setCell(cell(tr, "name"), "(no interface)");
    setCell(cell(tr, "rate"), fmtRate(s.unclassified.total), s.unclassified.total.toFixed(3));
    for (const o of ["ok", "limited", "shed", "degraded", "error"]) {
      setCell(cell(tr, o), fmtRate(s.unclassified[o]), s.unclassified[o].toFixed(3));
    }
  }
  sweep(tbody, keys);
  const w = $("window");
  w.dataset.startMs = s.window.start_ms;
  w.dataset.endMs = s.window.end_ms;
  setCell(w, "rates over the last " + s.window.seconds.toFixed(1) + " s");
}

function renderCanaries(s) {
  const tbody = $("canaries").tBodies[0];
  const keys = [];
  for (const c of s.canaries) {
    for (const t of c.targets) {
      const k = c.rule + "→" + t.upstream;
      keys.push(k);
      const tr = row(tbody, k, ["rule", "target", "configured", "observed", "requests"],
        { "data-canary": c.rule, "data-target": t.upstream });
      setCell(cell(tr, "rule"), c.rule);
      setCell(cell(tr, "target"), t.upstream);
      setCell(cell(tr, "configured"), fmtPct(t.configured_share), t.ppm);
      setCell(cell(tr, "observed"), fmtPct(t.observed_share), t.observed_share == null ? "" : t.observed_share.toFixed(5));
      setCell(cell(tr, "requests"), String(t.requests), t.requests);
    }
    setCell($("share-window"), "observed over the last " + c.window_s.toFixed(0) + " s");
  }
  if (!keys.length) {
    keys.push("none");
    setCell(cell(row(tbody, "none", ["rule", "target", "configured", "observed", "requests"]), "rule"), "no split rules");
  }
  sweep(tbody, keys);
}

function renderUpstreams(s) {
  const tbody = $("upstreams").tBodies[0];
  const keys = [];
  for (const u of s.upstreams) {
    keys.push(u.name);
    const tr = row(tbody, u.name, ["name", "rate", "p50", "p99", "endpoints", "out"], { "data-upstream": u.name });
    setCell(cell(tr, "name"), u.name);
    setCell(cell(tr, "rate"), fmtRate(u.rate_per_s), u.rate_per_s.toFixed(3));
    setCell(cell(tr, "p50"), fmtMs(u.p50_ms), u.p50_ms);
    setCell(cell(tr, "p99"), fmtMs(u.p99_ms), u.p99_ms);
    // Endpoint health: how many are in rotation, and why each other one is not.
    const eps = u.endpoints || [];
    const up = eps.filter((e) => e.state === "healthy").length;
    setCell(cell(tr, "endpoints"), up + "/" + eps.length, up);
    const out = eps.filter((e) => e.state !== "healthy").map((e) => {
      const left = e.ejected_until_ms ? ", " + Math.max(0, Math.ceil((e.ejected_until_ms - Date.now()) / 1000)) + " s" : "";
      return e.address + " " + e.state + " (" + e.reason + left + ")";
    });
    setCell(cell(tr, "out"), out.length ? out.join("; ") : "—", out.length);
  }
  sweep(tbody, keys);
}

function renderCaches(s) {
  const tbody = $("caches").tBodies[0];
  const keys = [];
  for (const c of s.caches || []) {
    keys.push(c.interface);
    const tr = row(tbody, c.interface, ["name", "ratio", "hits", "coalesced", "misses"], { "data-cache": c.interface });
    setCell(cell(tr, "name"), c.interface + " (" + c.ttl_ms + " ms)");
    setCell(cell(tr, "ratio"), fmtPct(c.hit_ratio), c.hit_ratio == null ? "" : c.hit_ratio.toFixed(4));
    for (const k of ["hits", "coalesced", "misses"]) setCell(cell(tr, k), String(c[k]), c[k]);
  }
  sweep(tbody, keys);
}

function renderFacts(s) {
  const a = s.admission;
  setCell($("admission"), a.level == null ? "—" : a.level === 0 ? "0 (admitting all)" : String(a.level),
    a.level == null ? "" : a.level);
  setCell($("shed"), fmtRate(a.shed_per_s) + "/s", a.shed_per_s.toFixed(3));
  // Each plan in force with why (a trigger's figures), then the plans a trigger may switch on.
  const plans = s.plans || [];
  const on = plans.filter((p) => p.active);
  const armed = plans.filter((p) => !p.active && p.triggered).map((p) => p.name);
  const inForce = !plans.length ? s.active_plans
    : on.map((p) => p.name + " (" + p.cause + (p.cause === "auto" && p.reason ? ": " + p.reason : "") + ")");
  setCell($("plans"), (inForce.length ? "⚠ " + inForce.join("; ") : "none")
    + (armed.length ? " · trigger armed: " + armed.join(", ") : ""));
  // Each ramp: where it is, and the figures of its last judged window.
  const ramps = s.ramps || [];
  const rampText = (r) => {
    const v = r.verdict;
    const last = v ? " · last window: " + v.outcome + " (" + v.detail + ")" : "";
    const state = r.phase === "stepping" && r.stop ? "stopped (" + r.stop + ")" : r.phase.replace("_", " ");
    return (r.phase === "rolled_back" ? "■ " : r.phase === "held" ? "▲ " : "")
      + r.route + " → " + r.target + ": " + r.weight + ", step " + r.step + " of " + r.steps.length
      + ", " + state + last;
  };
  const rp = $("ramps");
  setCell(rp, ramps.length ? ramps.map(rampText).join("; ") : "none");
  rp.className = ramps.some((r) => r.phase === "rolled_back") ? "state-open"
    : ramps.some((r) => r.phase === "held") ? "state-half_open" : "";
  const br = $("breakers");
  const open = s.breakers.filter((b) => b.state !== "closed");
  const text = !s.breakers.length ? "none"
    : open.length ? open.map((b) => (b.state === "open" ? "■ " : "▲ ") + b.name + " → " + b.upstream + ": " + b.state.replace("_", "-") + (b.mode === "dry_run" ? " (dry run)" : "")).join("; ")
    : "all " + s.breakers.length + " closed";
  setCell(br, text, open.length);
  // A dry-run breaker's state is the one it would be in: shown, never alarmed on.
  const real = open.filter((b) => b.mode !== "dry_run");
  br.className = real.some((b) => b.state === "open") ? "state-open" : real.length ? "state-half_open" : "";
  const c = s.config;
  setCell($("cfg-generation"), String(c.generation));
  setCell($("cfg-hash"), c.hash || "—");
  setCell($("cfg-loaded"), c.loaded_at_ms ? new Date(c.loaded_at_ms).toLocaleString() : "—");
  setCell($("cfg-file"), c.file || "(not from a file: reload disabled)");
  const e = $("cfg-error");
  setCell(e, c.last_error ? "■ " + fmtTime(c.last_error_at_ms) + ": " + c.last_error : "none");
  e.className = c.last_error ? "err" : "";
  setCell($("cfg-summary"), "config gen " + c.generation + (c.hash ? " · " + c.hash : "") + (c.last_error ? " · ■ reload error" : ""));
}

// === charts: hand-drawn on <canvas> ===

function setupCanvas(cv) {
  const dpr = window.devicePixelRatio || 1;
  const w = cv.clientWidth || 600, h = cv.clientHeight || 170;
  if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
    cv.width = Math.round(w * dpr);
    cv.height = Math.round(h * dpr);
  }
  const ctx = cv.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

// A round grid step giving about four lines up to `v`.
function niceStep(v) {
  if (!(v > 0)) return 0.25;
  const raw = v / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

// lines: [{color, dash, points: [[t_ms, value|null], ...]}]
function drawChart(cv, nowMs, lines, unit) {
  const { ctx, w, h } = setupCanvas(cv);
  const L = 48, R = 8, T = 8, B = 22;
  const top = Math.max(0, ...lines.flatMap((l) => l.points.map((p) => p[1] || 0)));
  const step = niceStep(top), n = Math.max(1, Math.ceil(top / step - 1e-9)), max = step * n;
  const x = (t) => L + ((t - (nowMs - HISTORY_MS)) / HISTORY_MS) * (w - L - R);
  const y = (v) => T + (1 - v / max) * (h - T - B);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#57606a";
  ctx.strokeStyle = "#d0d7de";
  ctx.lineWidth = 1;
  ctx.setLineDash([]);
  for (let i = 0; i <= n; i++) {
    const v = step * i, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(w - R, yy); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(v >= 10 ? v.toFixed(0) : v.toFixed(1), L - 6, yy);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let m = 0; m <= 5; m++) {
    ctx.fillText(m === 0 ? "now" : "-" + m + "m", x(nowMs - m * 60000), h - B + 6);
  }
  ctx.save(); ctx.translate(10, T + (h - T - B) / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.fillText(unit, 0, 0); ctx.restore();
  ctx.lineWidth = 2;
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.setLineDash(l.dash);
    ctx.beginPath();
    let pen = false;
    for (const [t, v] of l.points) {
      if (v == null) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true;
    }
    ctx.stroke();
  }
  ctx.setLineDash([]);
}

function legend(box, items) {
  // Rebuilt only when it changes; labels (upstream names) are text nodes.
  const key = JSON.stringify(items);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...items.map((i) => {
    const swatch = el("i", i.dash ? "dash" : "");
    swatch.style.borderTopColor = i.color;
    const item = el("span");
    item.append(swatch, document.createTextNode(i.label));
    return item;
  }));
}

function renderCharts(s) {
  const t = s.series.t_ms;
  const dt = t.map((v, i) => (v - (i ? t[i - 1] : s.series.start_ms)) / 1000 || 1);
  const lines = OUTCOMES.map((o) => ({
    color: o.color, dash: o.dash,
    points: s.series.outcomes[o.key].map((n, i) => [t[i], n / dt[i]]),
  }));
  drawChart($("chart-outcomes"), s.now_ms, lines, "req/s");
  legend($("legend-outcomes"), OUTCOMES.map((o) => ({ color: o.color, dash: o.dash.length > 0, label: o.label })));
  const lat = [], items = [];
  s.series.upstreams.forEach((u, k) => {
    const color = UPSTREAM_COLORS[k % UPSTREAM_COLORS.length];
    lat.push({ color, dash: [], points: u.p50_ms.map((v, i) => [t[i], v]) });
    lat.push({ color, dash: [6, 4], points: u.p99_ms.map((v, i) => [t[i], v]) });
    items.push({ color, dash: false, label: u.name + " p50" }, { color, dash: true, label: u.name + " p99" });
  });
  drawChart($("chart-latency"), s.now_ms, lat, "ms");
  legend($("legend-latency"), items);
}

function render(s) {
  if (!s.sampled) return;
  renderLevels(s);
  renderCanaries(s);
  renderUpstreams(s);
  renderCaches(s);
  renderFacts(s);
  renderCharts(s);
  setCell($("updated"), "updated " + fmtTime(s.now_ms), s.now_ms);
}

async function poll() {
  try {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 3000);
    const r = await fetch("/admin/status.json", { cache: "no-store", signal: ctl.signal, headers: authHeaders() });
    clearTimeout(timer);
    if (r.status === 401) askToken();
    if (!r.ok) throw new Error("HTTP " + r.status);
    const s = await r.json();
    render(s);
    document.body.dataset.state = "live";
    setCell($("conn"), "● live");
    delay = 1000;
  } catch (e) {
    document.body.dataset.state = "reconnecting";
    setCell($("conn"), "■ reconnecting… (retry in " + delay / 1000 + " s)");
    setTimeout(poll, delay);
    delay = Math.min(delay * 2, 8000);
    return;
  }
  setTimeout(poll, 1000);
}

takeTokenFromFragment();
poll();
