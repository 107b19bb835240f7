// swarmtrain dashboard: plain JavaScript over the REST API, no build step.
// The access token lives in sessionStorage (this tab only) and travels as a Bearer header; it is
// never put in a URL. Live events come from GET /sessions/{id}/stream read with fetch() and a
// stream reader, since EventSource cannot send an Authorization header.
"use strict";

const TOKEN_KEY = "swarmtrain.token";
const body = document.body;
const PREFIX = body.dataset.prefix || "/ui";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
// each strategy's rules ({description, shared_model, rounds, sharded}) by name, from the page: the
// script asks them (rules(s.strategy).rounds) and never compares a strategy's name
const STRATEGY_RULES = JSON.parse(document.getElementById("strategy-rules").textContent);
const NO_RULES = { description: "", shared_model: false, rounds: false, sharded: false };

function rules(strategy) {
  return STRATEGY_RULES[strategy] || NO_RULES;
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  return headers;
}

async function problem(resp) {
  let detail = resp.status + " " + resp.statusText;
  try {
    const data = await resp.json();
    if (data && data.detail) detail = data.detail;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401 && page() !== "signin") {
    sessionStorage.removeItem(TOKEN_KEY);
    location.assign(PREFIX + "/signin");
  }
  return new ApiError(resp.status, detail);
}

async function api(method, path, data) {
  const init = { method, headers: authHeaders({ Accept: "application/json" }) };
  if (data !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(data);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await problem(resp);
  return resp.status === 204 ? null : resp.json();
}

function page() {
  return body.dataset.page;
}

// ------------------------------------------------------------------ small helpers

function $(sel, root) {
  return (root || document).querySelector(sel);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function showError(err) {
  const box = $("#error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = err instanceof ApiError ? err.message : String(err.message || err);
  box.hidden = false;
}

function fmt(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 3 : digits);
}

function short(id) {
  return id ? id.slice(0, 8) : "";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function seconds(a, b) {
  if (!a || !b) return "–";
  const s = (new Date(b) - new Date(a)) / 1000;
  return s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}

function numbers(text) {
  return String(text || "").split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// ------------------------------------------------------------------ charts (uPlot)

// One chart: a series per key (peer or session); points arrive one at a time and are drawn at most
// once per animation frame, so a 1,000-point series streams without stutter.
class LiveChart {
  constructor(target, opts) {
    this.target = target;
    this.yLabel = opts.yLabel;
    this.xLabel = opts.xLabel || "epoch";
    this.range = opts.range;
    this.series = new Map(); // key -> {label, xs: [], ys: []}
    this.plot = null;
    this.pending = false;
  }

  add(key, label, x, y) {
    let s = this.series.get(key);
    if (!s) {
      s = { label, xs: [], ys: [] };
      this.series.set(key, s);
      this.rebuild = true;
    }
    const last = s.xs.length - 1;
    if (last >= 0 && s.xs[last] === x) s.ys[last] = y; // a repeated epoch replaces its point
    else {
      s.xs.push(x);
      s.ys.push(y);
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  data() {
    const keys = [...this.series.keys()];
    const xs = [...new Set(keys.flatMap((k) => this.series.get(k).xs))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const cols = keys.map((k) => {
      const s = this.series.get(k);
      const col = new Array(xs.length).fill(null);
      s.xs.forEach((x, i) => { col[index.get(x)] = s.ys[i]; });
      return col;
    });
    return [xs, ...cols];
  }

  draw() {
    if (!window.uPlot || this.series.size === 0) return;
    const data = this.data();
    if (this.plot && !this.rebuild) {
      this.plot.setData(data);
      return;
    }
    this.rebuild = false;
    if (this.plot) this.plot.destroy();
    const width = Math.max(280, this.target.clientWidth || 480);
    const series = [{ label: this.xLabel }];
    [...this.series.values()].forEach((s, i) => {
      series.push({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 4 } });
    });
    const y = this.range ? { range: this.range } : {};
    this.plot = new uPlot(
      {
        width,
        height: 240,
        series,
        scales: { x: { time: false }, y },
        axes: [{ label: this.xLabel }, { label: this.yLabel }],
        legend: { live: true },
      },
      data,
      this.target,
    );
  }

  clear() {
    this.series.clear();
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.target.replaceChildren();
  }
}

// ------------------------------------------------------------------ SSE over fetch

// Reads text/event-stream from a fetch() body; calls onMessage({id, event, data}) per message and
// resumes from the last id if the connection drops, until stop() is called or done() is true.
function streamEvents(path, onMessage, done) {
  let lastId = 0;
  let stopped = false;
  const controller = { abort: null };

  async function once() {
    const ac = new AbortController();
    controller.abort = () => ac.abort();
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = String(lastId);
    const resp = await fetch(path, { headers, signal: ac.signal, cache: "no-store" });
    if (!resp.ok) throw await problem(resp);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) return;
      buffer += value;
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const msg = { id: null, event: "message", data: "" };
        for (const line of block.split(/\r?\n/)) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "id") msg.id = Number(val);
          else if (field === "event") msg.event = val;
          else if (field === "data") msg.data += (msg.data ? "\n" : "") + val;
        }
        if (!msg.data) continue;
        if (msg.id) lastId = msg.id;
        onMessage(msg);
      }
    }
  }

  (async () => {
    let delay = 500;
    while (!stopped && !done()) {
      try {
        await once();
        delay = 500;
      } catch (err) {
        if (stopped) return;
        if (err instanceof ApiError && err.status !== 429 && err.status < 500) {
          showError(err);
          return;
        }
      }
      if (stopped || done()) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return { stop() { stopped = true; if (controller.abort) controller.abort(); } };
}

// ------------------------------------------------------------------ pages

async function whoAmI() {
  if (!token()) {
    if (page() !== "signin") location.assign(PREFIX + "/signin");
    return null;
  }
  try {
    const me = await api("GET", "/auth/me");
    $("#who").textContent = me.email;
    $("#signout").hidden = false;
    return me;
  } catch (err) {
    showError(err);
    return null;
  }
}

function formData(form) {
  return Object.fromEntries(new FormData(form).entries());
}

async function signinPage() {
  async function signIn(email, password) {
    const out = await api("POST", "/auth/signin", { email, password });
    sessionStorage.setItem(TOKEN_KEY, out.access_token);
    location.assign(PREFIX + "/sessions");
  }
  $("#signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(null);
    const f = formData(e.target);
    try { await signIn(f.email, f.password); } catch (err) { showError(err); }
  });
  $("#signup-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(null);
    const f = formData(e.target);
    const data = { email: f.email, password: f.password };
    if (f.username) data.username = f.username;
    try {
      await api("POST", "/auth/signup", data);
      await signIn(f.email, f.password);
    } catch (err) { showError(err); }
  });
}

async function peersPage() {
  async function load() {
    try {
      const peers = await api("GET", "/peers");
      const online = peers.filter((p) => p.status !== "offline").length;
      $("#peer-summary").textContent = `${online} of ${peers.length} online.`;
      fillRows($("#peers tbody"), peers.map((p) => el("tr", { "data-status": p.status },
        el("td", {}, p.name), el("td", {}, p.device), el("td", { class: "specs" }, specsText(p.specs)),
        el("td", {}, el("span", { class: "badge " + p.status, text: p.status })),
        el("td", {}, when(p.last_seen)),
        el("td", {}, p.session_id ? el("a", { href: `${PREFIX}/sessions/${p.session_id}`, text: short(p.session_id) }) : "–"))));
      showError(null);
    } catch (err) { showError(err); }
  }
  await load();
  setInterval(load, 3000); // peers have no stream of their own: a light refresh
}

function gibText(n) {
  return (n / 1073741824).toFixed(n < 10737418240 ? 1 : 0) + " GiB";
}

function specsText(s) {
  if (!s) return "–";
  const parts = [`${s.cpu_cores} cores`, `${gibText(s.memory_bytes)} RAM`];
  for (const g of s.gpus) parts.push(`${g.name} ${gibText(g.memory_bytes)} (sm ${g.compute_capability})`);
  parts.push(`torch ${s.torch_version}` + (s.cuda_version ? ` CUDA ${s.cuda_version}` : ""));
  const labels = Object.entries(s.labels).map(([k, v]) => `${k}=${v}`);
  if (labels.length) parts.push(labels.join(" "));
  return parts.join(" · ");
}

function kib(n) {
  return n < 1024 * 1024 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
}

async function datasetsPage() {
  async function load() {
    const rows = await api("GET", "/datasets");
    fillRows($("#datasets tbody"), rows.map((d) => {
      const tr = el("tr", { class: "clickable", title: "preview" },
        el("td", {}, d.name), el("td", {}, d.format), el("td", {}, d.rows), el("td", {}, d.features),
        el("td", {}, d.classes), el("td", {}, d.label_column), el("td", {}, kib(d.size_bytes)),
        el("td", {}, when(d.created_at)), el("td", {}, el("code", { text: d.dataset_id })));
      tr.addEventListener("click", () => preview(d).catch(showError));
      return tr;
    }));
  }
  async function preview(d) {
    const look = await api("GET", `/datasets/${d.dataset_id}/preview`);
    $("#preview-title").textContent = `${d.name} (${d.format}, ${d.rows} rows)`;
    const body = $("#preview-body");
    const parts = [];
    if (look.rows.length) {
      parts.push(el("table", { class: "preview-rows" },
        el("thead", {}, el("tr", {}, ...look.columns.map((c) => el("th", {}, c)))),
        el("tbody", {}, ...look.rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c)))))));
    }
    for (const [label, thumbs] of Object.entries(look.thumbnails)) {
      const imgs = thumbs.map((t) => {
        const img = el("img", { class: "thumbnail", alt: label });
        img.src = "data:image/png;base64," + t;
        return img;
      });
      parts.push(el("div", { class: "thumbnails" }, el("strong", {}, label + " "), ...imgs));
    }
    if (look.lines.length) {
      parts.push(el("p", { class: "hint" }, `${look.tokens} tokens; the first lines:`));
      parts.push(el("pre", { class: "preview-lines" }, look.lines.join("\n")));
    }
    body.replaceChildren(...parts);
    const counts = Object.entries(look.class_counts);
    const most = Math.max(1, ...counts.map(([, n]) => n));
    $("#preview-classes").replaceChildren(...counts.map(([name, n]) => el("div", { class: "class-bar" },
      el("span", { class: "class-name" }, name),
      el("span", { class: "bar", style: `width: ${Math.max(1, Math.round(200 * n / most))}px` }),
      el("span", { class: "hint" }, String(n)))));
    $("#preview").hidden = false;
  }
  $("#upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    showError(null);
    const form = e.target;
    const bar = $("#upload-progress");
    const status = $("#upload-status");
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/datasets");
    xhr.setRequestHeader("Authorization", "Bearer " + token());
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (ev) => {
      if (ev.lengthComputable) {
        bar.value = Math.round((100 * ev.loaded) / ev.total);
        status.textContent = `${kib(ev.loaded)} of ${kib(ev.total)}`;
      }
    });
    xhr.addEventListener("load", async () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status === 201) {
        bar.value = 100;
        status.textContent = `uploaded: ${data.rows} rows, ${data.features} features, ${data.classes} classes (${data.format})`;
        form.reset();
        await load();
      } else {
        status.textContent = "";
        showError(new ApiError(xhr.status, (data && data.detail) || `${xhr.status} ${xhr.statusText}`));
      }
    });
    xhr.addEventListener("error", () => showError(new Error("the upload failed: network error")));
    bar.hidden = false;
    bar.value = 0;
    const body = new FormData(form);
    for (const [name, value] of [...body.entries()]) {
      if (value === "") body.delete(name);  // an option left empty is the gateway's default
    }
    xhr.send(body);
  });
  try { await load(); } catch (err) { showError(err); }
}

async function newPage() {
  const form = $("#session-form");
  function toggle() {
    const f = formData(form);
    form.classList.toggle("has-rounds", rules(f.strategy).rounds);
    form.classList.toggle("shared-model", rules(f.strategy).shared_model);
    form.classList.toggle("is-cnn", f.kind === "cnn");
    form.classList.toggle("is-spec", f.kind !== "cnn" && f.kind !== "mlp");
  }
  form.addEventListener("change", toggle);
  toggle();
  try {
    const datasets = await api("GET", "/datasets");
    form.elements.dataset_id.replaceChildren(...datasets.map((d) =>
      el("option", { value: d.dataset_id, text: `${d.name} · ${d.rows} rows · ${d.classes} classes · ${short(d.dataset_id)}` })));
    if (!datasets.length) showError(new Error("upload a dataset first (Datasets)"));
  } catch (err) { showError(err); }
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError(null);
    const f = formData(form);
    const numPeers = Number(f.num_peers);
    const lrs = numbers(f.lr);
    const hp = (lr) => ({ epochs: Number(f.epochs), batch_size: Number(f.batch_size), lr });
    let model = { kind: f.kind };
    if (f.kind === "mlp" || f.kind === "cnn") model.hidden = numbers(f.hidden);
    else if (f.model_fields) {
      // resnet, transformer, layers: their fields as the REST body takes them (README "Model kinds")
      try { model = { ...JSON.parse(f.model_fields), kind: f.kind }; } catch (err) {
        showError(new Error(`model fields are not JSON: ${err.message}`)); return;
      }
    }
    if (f.kind === "cnn") {
      if (f.input_shape) model.input_shape = numbers(f.input_shape);
      if (f.channels) model.channels = numbers(f.channels);
    }
    const data = {
      dataset_id: f.dataset_id,
      num_peers: numPeers,
      strategy: f.strategy,
      model,
      hyperparameters: !rules(f.strategy).shared_model && lrs.length > 1 ? lrs.map(hp) : hp(lrs[0]),
      validation_split: Number(f.validation_split),
      seed: Number(f.seed),
    };
    if (rules(f.strategy).rounds) {
      data.rounds = Number(f.rounds);
      data.on_peer_failure = f.on_peer_failure;
    }
    try {
      const out = await api("POST", "/sessions", data);
      location.assign(`${PREFIX}/sessions/${out.session_id}`);
    } catch (err) { showError(err); }
  });
}

// ---- one session

// ------------------------------------------------------------------ a search (SVG, no library)

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function plot(points, { w = 320, h = 180, xs, ys, logX = false, lines = [], xlabels = null }) {
  // points: [{x, y, pruned, label}]; lines: [{pts: [[x, y]], pruned}]; a small scatter / line chart;
  // xlabels: what the axis's two ends say (default: xs)
  const pad = 28;
  const tx = (x) => (logX ? Math.log10(x) : x);
  const [x0, x1] = xs.map(tx);
  const [y0, y1] = ys;
  const sx = (x) => pad + ((tx(x) - x0) / ((x1 - x0) || 1)) * (w - 2 * pad);
  const sy = (y) => h - pad - ((y - y0) / ((y1 - y0) || 1)) * (h - 2 * pad);
  const root = svg("svg", { width: w, height: h, class: "plot" },
    svg("line", { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, stroke: "#888" }),
    svg("line", { x1: pad, y1: pad, x2: pad, y2: h - pad, stroke: "#888" }),
    svg("text", { x: pad, y: h - 8, "font-size": 10 }, String((xlabels || xs)[0])),
    svg("text", { x: w - pad, y: h - 8, "font-size": 10, "text-anchor": "end" }, String((xlabels || xs)[1])),
    svg("text", { x: 2, y: pad, "font-size": 10 }, fmt(ys[1], 2)),
    svg("text", { x: 2, y: h - pad, "font-size": 10 }, fmt(ys[0], 2)));
  for (const l of lines) {
    if (!l.pts.length) continue;
    const d = l.pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x)},${sy(y)}`).join(" ");
    root.append(svg("path", { d, fill: "none", stroke: l.pruned ? "#c33" : "#36c", "stroke-dasharray": l.pruned ? "4 3" : "", "stroke-width": 1.2 }));
    if (l.pruned) {
      const [x, y] = l.pts[l.pts.length - 1];
      root.append(svg("text", { x: sx(x) - 4, y: sy(y) + 4, fill: "#c33", "font-size": 12 }, "✕"));
    }
  }
  for (const p of points) {
    const dot = p.pruned
      ? svg("text", { x: sx(p.x) - 4, y: sy(p.y) + 4, fill: "#c33", "font-size": 12, class: "pruned" }, "✕")
      : svg("circle", { cx: sx(p.x), cy: sy(p.y), r: 4, fill: "#36c", class: "done" });
    dot.append(svg("title", {}, p.label));
    root.append(dot);
  }
  return root;
}

function renderSearch(s) {
  const q = s.search;
  $("#search-section").hidden = !q;
  if (!q) return;
  const metric = q.spec.metric || "val_accuracy";
  $("#search-counts").textContent = `${q.done} done · ${q.running} running · ${q.pruned} pruned · ${q.failed} failed · ` +
    `${q.left} left` + (q.eta_s ? ` · about ${Math.round(q.eta_s)} s to go` : "");
  $("#search-best").textContent = q.best
    ? `Best: trial ${q.best.trial}, ${metric} ${fmt(q.best.value)} as the scheduler measured it: ${JSON.stringify(q.best.params)}` +
      ` · start from it: swarmtrain sessions start --from-best ${s.session_id}`
    : "";
  const imp = Object.entries(q.importances);
  $("#importances").replaceChildren(...(imp.length ? imp.map(([k, v]) => el("div", { class: "bar-row", "data-key": k },
    el("span", { class: "bar-label", text: k }),
    el("span", { class: "bar", style: `width: ${Math.max(1, Math.round(v * 200))}px` }),
    el("span", { class: "bar-value", text: fmt(v, 3) }))) : [el("p", { class: "hint", text: "once the search ends" })]));
  const judged = q.trials.filter((t) => t.value !== null);
  const values = judged.map((t) => t.value);
  const ys = values.length ? [Math.min(...values), Math.max(...values)] : [0, 1];
  const maxEpoch = Math.max(1, ...q.trials.map((t) => t.epochs));
  // the curves' own range: a trial's early epochs lie below (or above) every final figure
  const onCurves = q.trials.flatMap((t) => t.curve.map(([, y]) => y)).concat(values);
  const curveYs = onCurves.length ? [Math.min(...onCurves), Math.max(...onCurves)] : [0, 1];
  $("#trial-curves").replaceChildren(plot([], { xs: [1, maxEpoch], ys: curveYs,
    lines: q.trials.map((t) => ({ pts: t.curve, pruned: t.status === "pruned" })) }));
  $("#trial-scatter").replaceChildren(...Object.entries(q.spec.space).map(([key, param]) => {
    // a choice is placed by its index among the choices, its axis labelled with the first and last
    const choices = param.choice || null;
    const pts = judged.filter((t) => key in t.params).map((t) => ({
      x: choices ? choices.indexOf(t.params[key]) : t.params[key],
      y: t.value, pruned: t.status === "pruned", label: `trial ${t.trial}: ${key}=${t.params[key]} → ${fmt(t.value)} (${t.status})` }));
    const range = choices ? [0, choices.length - 1] : param.log_uniform || param.uniform || param.int;
    const xlabels = choices ? [choices[0], choices[choices.length - 1]] : null;
    return el("figure", { "data-key": key }, el("figcaption", { text: `${metric} vs ${key}` }),
      plot(pts, { xs: range, ys, logX: !!param.log_uniform, xlabels }));
  }));
  fillRows($("#trials tbody"), q.trials.map((t) => el("tr", { "data-trial": t.trial, class: t.status === "pruned" ? "pruned" : null },
    el("td", {}, t.trial + (t.attempt ? ` (run ${t.attempt + 1})` : "")),
    el("td", {}, el("span", { class: "badge " + t.status, text: t.status + (t.rung ? ` at ${t.rung}` : "") })),
    el("td", {}, el("code", { text: short(t.peer_id) })), el("td", {}, `${t.epoch}/${t.epochs}`),
    el("td", {}, Object.entries(t.params).map(([k, v]) => `${k}=${typeof v === "number" ? +v.toPrecision(3) : v}`).join(", ")),
    el("td", { class: "num" }, fmt(t.value)), el("td", {}, t.reason || ""))));
}

async function sessionPage() {
  const sid = body.dataset.sessionId;
  let session;
  try {
    session = await api("GET", `/sessions/${sid}`);
  } catch (err) {
    if (err.status === 404) {
      $("#session-404-detail").textContent = err.message;
      $("#session-404").hidden = false;
      document.title = "404 · swarmtrain";
      return;
    }
    showError(err);
    return;
  }
  $("#session").hidden = false;
  // the task's score (common.tasks): accuracy in [0, 1]; a regression's R² (at most 1, unbounded below)
  const SCORES = { classification: "accuracy", regression: "R²", language_modeling: "next-token accuracy" };
  const LOSSES = { classification: "loss", regression: "loss (MSE)", language_modeling: "loss (cross-entropy)" };
  const task = session.task || "classification";
  const score = SCORES[task] || "accuracy";
  const scoreRange = task === "regression" ? undefined : [0, 1];
  const charts = {
    loss: new LiveChart($("#chart-loss"), { yLabel: LOSSES[task] || "loss" }),
    val: new LiveChart($("#chart-val"), { yLabel: `val ${score}`, range: scoreRange }),
    acc: new LiveChart($("#chart-acc"), { yLabel: score, range: scoreRange }),
  };
  const reassigned = new Map(); // round -> ["shard s: a → b"]
  let events = 0;
  let beats = 0;
  let ended = TERMINAL.has(session.status);
  const live = $("#live");

  function render() {
    const s = session;
    const status = $("#status");
    status.textContent = s.status;
    status.className = "badge " + s.status;
    body.dataset.status = s.status;
    const model = s.model.kind + (s.model.hidden && s.model.hidden.length ? " " + s.model.hidden.join("×") : "");
    $("#summary").textContent = `${s.strategy} over ${s.num_peers} peers · ${model} · ` +
      (rules(s.strategy).rounds ? `${s.rounds} rounds · ` : "") +
      `dataset ${short(s.dataset_id)} · created ${when(s.created_at)}` +
      (s.ended_at ? ` · took ${seconds(s.started_at || s.created_at, s.ended_at)}` : "") +
      (s.val_accuracy !== null ? ` · val ${score} ${fmt(s.val_accuracy)}` : "") +
      (s.reason ? ` · ${s.reason}` : "");
    $("#round-options").hidden = !s.round_options_summary;
    $("#round-options-text").textContent = s.round_options_summary || "";
    $("#lineage").hidden = !s.parent_session_id;
    if (s.parent_session_id) {
      const link = $("#parent-link");
      link.textContent = short(s.parent_session_id);
      link.href = `${PREFIX}/sessions/${encodeURIComponent(s.parent_session_id)}`;
      $("#parent-detail").textContent = (s.parent_round !== null ? ` at round ${s.parent_round}` : " (its final model)") +
        (s.excluded_peers.length ? `, without ${s.excluded_peers.map(short).join(", ")}` : "");
    }
    $("#cancel").hidden = TERMINAL.has(s.status);
    $("#peers-section").hidden = !!s.search; // a search's peers and figures are its trials'
    for (const per of document.querySelectorAll(".charts .per")) per.textContent = s.search ? "trial" : "peer";
    $("#download").hidden = !s.model_available;
    const ranked = [...s.peers].sort((a, b) => (b.val_accuracy ?? -1) - (a.val_accuracy ?? -1));
    fillRows($("#leaderboard tbody"), ranked.map((p, i) => el("tr", { "data-peer": p.peer_id, class: p.peer_id === s.best_peer_id ? "best" : null },
      el("td", {}, i + 1), el("td", {}, el("code", { text: short(p.peer_id) }), p.shard !== null ? ` shard ${p.shard}` : ""),
      el("td", {}, el("span", { class: "badge " + p.status, text: p.status })),
      el("td", {}, `${p.epoch}/${p.epochs}`), el("td", {}, p.hyperparameters.lr), el("td", {}, p.hyperparameters.batch_size),
      el("td", {}, fmt(p.loss)), el("td", {}, fmt(p.val_loss)), el("td", { class: "num" }, fmt(p.val_accuracy)),
      el("td", {}, p.samples_per_s ? Math.round(p.samples_per_s).toLocaleString() : "–"),
      el("td", {}, p.peer_id === s.best_peer_id ? "★ best" : (p.reason || "")))));
    renderSearch(s);
    $("#rounds-section").hidden = !rules(s.strategy).rounds;
    let previous = s.started_at;
    fillRows($("#rounds tbody"), s.round_figures.map((r) => {
      const row = el("tr", {},
        el("td", {}, r.round), el("td", {}, seconds(previous, r.closed_at)),
        el("td", {}, r.included.map(short).join(", ") || "–"),
        el("td", {}, r.left_out.map(short).join(", ") || "–"),
        el("td", {}, r.rejected.map((x) => `${short(x.peer_id)}: ${x.reason}`).join("; ") || "–"),
        el("td", {}, (reassigned.get(r.round) || []).join("; ") || "–"),
        el("td", {}, r.num_samples), el("td", {}, fmt(r.loss)), el("td", {}, fmt(r.val_accuracy)),
        el("td", {}, r.aggregator ? r.aggregator + (r.selected.length && r.selected.length < r.included.length
          ? ` (${r.selected.map(short).join(", ")})` : "") : "–"),
        el("td", {}, r.update_bytes ? r.update_bytes.toLocaleString() : "–"));
      previous = r.closed_at;
      return row;
    }));
  }

  let rendering = false;
  function renderSoon() {
    if (rendering) return;
    rendering = true;
    requestAnimationFrame(() => { rendering = false; render(); });
  }

  let refreshing = null;
  function refresh(wait = 150) { // a burst of events reads the session once
    if (refreshing) return;
    refreshing = setTimeout(async () => {
      refreshing = null;
      try {
        session = await api("GET", `/sessions/${sid}`);
        render();
        // the stream reads the log, the session comes from the read models, which may lag behind it:
        // once the stream says the session ended, read again (backing off) until they say so too
        if (ended && !TERMINAL.has(session.status)) refresh(Math.min(2 * wait, 2000));
      } catch (err) { showError(err); }
    }, wait);
  }

  const timeline = $("#timeline");
  const trialOf = (e) => (e.trial !== null && e.trial !== undefined ? ` (trial ${e.trial})` : "");
  function describe(e) {
    switch (e.type) {
      case "SessionRequested": return `${e.strategy} over ${e.num_peers} peers requested`;
      case "SessionStarted": return Object.keys(e.assignments).length
        ? `started on ${Object.keys(e.assignments).map(short).join(", ")}`
        : "started: its trials go to its peers as they free up";
      case "TrialStarted": return `trial ${e.trial}${e.attempt ? ` (run ${e.attempt + 1})` : ""} on ${short(e.peer_id)}: ` +
        Object.entries(e.params).map(([k, v]) => `${k}=${typeof v === "number" ? +v.toPrecision(3) : v}`).join(", ");
      case "TrialPruned": return `trial ${e.trial} on ${short(e.peer_id)} stopped at epoch ${e.rung} (${fmt(e.value)})`;
      case "SearchConcluded": return `${e.done} done, ${e.pruned} pruned, ${e.failed} failed; best: trial ${e.best_trial ?? "–"} (${fmt(e.best_value)})`;
      case "PeerDone": return `${short(e.peer_id)} done${trialOf(e)}: val accuracy ${fmt(e.val_accuracy)} in ${fmt(e.train_seconds, 1)} s`;
      case "PeerFailed": return `${short(e.peer_id)} failed${trialOf(e)}: ${e.reason}`;
      case "ModelUpdatePublished": return `${short(e.peer_id)} published round ${e.round} (${e.num_samples} samples)`;
      case "RoundClosed": return `round ${e.round} closed with ${e.updates.map((u) => short(u.peer_id)).join(", ")}` +
        (e.left_out.length ? `; left out ${e.left_out.map(short).join(", ")}` : "");
      case "RoundAveraged": return `round ${e.round} averaged: val accuracy ${fmt(e.val_accuracy)}`;
      case "UpdateRejected": return `round ${e.round}: ${short(e.peer_id)} rejected: ${e.reason}`;
      case "ShardReassigned": return `round ${e.round}: shard ${e.shard} moved ${short(e.from_peer_id)} → ${short(e.to_peer_id)}`;
      case "SessionCompleted": return `completed: best ${short(e.best_peer_id)}${e.best_trial != null ? `, trial ${e.best_trial}` : ""} (${fmt(e.best_val_accuracy)})`;
      case "SessionFailed": return `failed: ${e.reason}`;
      case "SessionCancelled": return `cancelled: ${e.reason}`;
      default: return "";
    }
  }

  function onMessage(msg) {
    const e = JSON.parse(msg.data);
    events += 1;
    if (e.type === "Heartbeat") {
      beats += 1;
      // a search's peer runs trial after trial: a curve per trial (and peer: a re-run is its own)
      const searching = e.trial !== null && e.trial !== undefined;
      const key = searching ? `${e.trial}/${e.peer_id}` : e.peer_id;
      const label = searching ? `trial ${e.trial}` : short(e.peer_id);
      charts.loss.add(key, label, e.epoch, e.loss);
      charts.acc.add(key, label, e.epoch, e.accuracy);
      if (e.val_accuracy !== null && e.val_accuracy !== undefined) charts.val.add(key, label, e.epoch, e.val_accuracy);
      body.dataset.points = String(beats);
      const p = session.peers.find((x) => x.peer_id === e.peer_id);
      if (p) {
        Object.assign(p, { epoch: e.epoch, epochs: e.epochs, loss: e.loss, accuracy: e.accuracy, val_loss: e.val_loss, val_accuracy: e.val_accuracy, samples_per_s: e.samples_per_s });
        renderSoon();
      } else refresh();
    } else {
      if (e.type === "ShardReassigned") {
        const list = reassigned.get(e.round) || [];
        list.push(`shard ${e.shard}: ${short(e.from_peer_id)} → ${short(e.to_peer_id)}`);
        reassigned.set(e.round, list);
      }
      timeline.append(el("li", { "data-type": e.type },
        el("time", { text: new Date(e.occurred_at).toLocaleTimeString() }), " ",
        el("strong", { text: e.type }), " ", describe(e)));
      if (["SessionCompleted", "SessionFailed", "SessionCancelled"].includes(e.type)) ended = true;
      refresh();
    }
    $("#event-count").textContent = `${events} events, ${beats} heartbeats`;
    live.textContent = ended ? "" : "● live";
  }

  $("#cancel").addEventListener("click", async () => {
    showError(null);
    try {
      await api("POST", `/sessions/${sid}/cancel`);
      refresh();
    } catch (err) { showError(err); }
  });
  $("#download").addEventListener("click", async () => {
    showError(null);
    try {
      const resp = await fetch(`/sessions/${sid}/model`, { headers: authHeaders() });
      if (!resp.ok) throw await problem(resp);
      const blob = await resp.blob();
      const url = URL.createObjectURL(blob);
      const a = el("a", { href: url, download: `${sid}.safetensors` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) { showError(err); }
  });
  render();
  live.textContent = ended ? "" : "● live";
  // the stream replays the whole history first, then follows; it ends with the session
  streamEvents(`/sessions/${sid}/stream`, onMessage, () => ended && events > 0);
}

// ---- sessions list and comparison

async function sessionsPage() {
  const compare = new LiveChart($("#chart-compare"), { yLabel: "val accuracy", range: [0, 1] });
  const chosen = new Set();
  async function draw() {
    compare.clear();
    $("#compare-figure").hidden = chosen.size === 0;
    $("#compare-label").textContent = [...chosen].map(short).join(", ");
    for (const sid of chosen) {
      const m = await api("GET", `/sessions/${sid}/metrics`);
      for (const p of m.peers) {
        for (const pt of p.points) {
          if (pt.val_accuracy !== null) compare.add(`${sid}/${p.peer_id}`, `${short(sid)}·${short(p.peer_id)}`, pt.epoch, pt.val_accuracy);
        }
      }
    }
  }
  try {
    const sessions = await api("GET", "/sessions");
    fillRows($("#sessions tbody"), sessions.map((s) => el("tr", { "data-status": s.status },
      el("td", {}, el("input", { type: "checkbox", value: s.session_id, "aria-label": "compare " + short(s.session_id), onchange: async (e) => {
        if (e.target.checked) chosen.add(s.session_id); else chosen.delete(s.session_id);
        try { await draw(); } catch (err) { showError(err); }
      } })),
      el("td", {}, el("a", { href: `${PREFIX}/sessions/${s.session_id}` }, el("code", { text: short(s.session_id) }))),
      el("td", {}, el("span", { class: "badge " + s.status, text: s.status })),
      el("td", {}, s.strategy), el("td", {}, s.num_peers), el("td", {}, rules(s.strategy).rounds ? s.rounds : "–"),
      el("td", {}, fmt(s.val_accuracy ?? s.best_val_accuracy)), el("td", {}, when(s.created_at)),
      el("td", {}, seconds(s.started_at, s.ended_at)))));
    if (!sessions.length) $("#sessions tbody").append(el("tr", {}, el("td", { colspan: 9 }, "No sessions yet: ", el("a", { href: PREFIX + "/new", text: "start one" }))));
  } catch (err) { showError(err); }
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", async () => {
  $("#signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.assign(PREFIX + "/signin");
  });
  const handlers = { signin: signinPage, peers: peersPage, datasets: datasetsPage, new: newPage, session: sessionPage, sessions: sessionsPage };
  if (page() !== "signin" && page() !== "notfound" && !(await whoAmI())) return;
  const run = handlers[page()];
  if (run) await run();
  body.dataset.ready = "1";
});
