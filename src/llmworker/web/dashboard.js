// The llmworker dashboard: polls /v1/stats and /v1/failures, follows one task's events.
// Plain ES2020, no dependencies. Every string from the API reaches the page through
// textContent or an attribute, never as markup.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEY_STORE = "llmworker.key";
  const DEFAULT_TENANT = "default";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const num = new Intl.NumberFormat("en");

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers -------------------------------------------------------------------

  /** An element; string children become text nodes. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Set a cell's text only when it changed (no layout churn on every poll). */
  function setText(node, value) {
    const s = value === null || value === undefined ? "" : String(value);
    if (node.textContent !== s) node.textContent = s;
  }

  /** Rebuild a cell's content only when its signature changed. */
  function fill(node, sig, make) {
    if (node.dataset.sig === sig) return;
    node.dataset.sig = sig;
    node.replaceChildren(...[].concat(make()).filter(Boolean));
  }

  /** Keyed rows: existing rows are kept (with their buttons' state), moved, updated. */
  function syncRows(tbody, items, keyOf, columns, update) {
    const existing = new Map();
    for (const tr of Array.from(tbody.rows)) existing.set(tr.dataset.key, tr);
    let prev = null;
    for (const item of items) {
      const key = keyOf(item);
      let tr = existing.get(key);
      if (tr) existing.delete(key);
      else {
        tr = el("tr");
        tr.dataset.key = key;
        for (const cls of columns) tr.append(el("td", { className: cls || null }));
      }
      update(tr, item, tr.cells);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const tr of existing.values()) tr.remove();
  }

  // ---- formatting --------------------------------------------------------------------

  function fmtSecs(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "—";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(2)} s`;
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  function fmtNum(n) {
    return n === null || n === undefined ? "—" : num.format(n);
  }

  let clockSkewMs = 0; // server time minus this browser's, from stats.now
  const serverNow = () => Date.now() + clockSkewMs;

  function fmtAgo(iso) {
    const t = Date.parse(iso || "");
    if (Number.isNaN(t)) return "—";
    const s = Math.max(0, (serverNow() - t) / 1000);
    if (s < 60) return `${Math.round(s)}s ago`;
    if (s < 3600) return `${Math.round(s / 60)}m ago`;
    if (s < 86400) return `${Math.round(s / 3600)}h ago`;
    return new Date(t).toLocaleDateString();
  }

  function fmtTime(iso) {
    const t = Date.parse(iso || "");
    if (Number.isNaN(t)) return "—";
    const d = new Date(t);
    const time = clock(d);
    const ms = `.${String(d.getMilliseconds()).padStart(3, "0")}`;
    return d.toDateString() === new Date().toDateString() ? time + ms : `${d.toLocaleDateString()} ${time}`;
  }

  /** 24-hour wall-clock time, as everywhere on the page. */
  function clock(d) {
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  }

  function hhmm(ms) {
    const d = new Date(ms);
    return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
  }

  const tenantQuery = (tenant) =>
    tenant && tenant !== DEFAULT_TENANT ? `?tenant=${encodeURIComponent(tenant)}` : "";
  const taskPath = (id, tenant, tail = "") =>
    `/v1/tasks/${encodeURIComponent(id)}${tail}${tenantQuery(tenant)}`;
  const taskHref = (id, tenant) => `#/tasks/${encodeURIComponent(id)}${tenantQuery(tenant)}`;

  function badge(status) {
    return el("span", { className: `badge s-${status || "unknown"}`, text: status || "?" });
  }

  function taskLink(id, tenant) {
    const link = el("a", { className: "mono", href: taskHref(id, tenant), title: id }, id);
    const other = tenant && tenant !== DEFAULT_TENANT;
    return el("span", { className: "tlink" }, other ? el("span", { className: "tenant", text: `${tenant}/` }) : null, link);
  }

  function meter(used, limit, extra = "") {
    const frac = limit > 0 ? Math.min(1, used / limit) : used > 0 ? 1 : 0;
    const level = `${frac >= 1 ? "full" : frac >= 0.75 ? "high" : "ok"} ${extra}`.trim();
    const bar = el("span", { className: `meter ${level}`, role: "meter" });
    bar.setAttribute("aria-valuenow", String(used));
    bar.setAttribute("aria-valuemax", String(limit));
    const fillBar = el("i");
    fillBar.style.width = `${(frac * 100).toFixed(1)}%`;
    bar.append(fillBar);
    return el("span", { className: "meter-wrap" }, bar, el("span", { className: "meter-n", text: `${used}/${limit}` }));
  }

  // ---- the key and the API -----------------------------------------------------------

  const store = {
    get() {
      try {
        return localStorage.getItem(KEY_STORE) || "";
      } catch {
        return "";
      }
    },
    set(key) {
      try {
        if (key) localStorage.setItem(KEY_STORE, key);
        else localStorage.removeItem(KEY_STORE);
      } catch {
        /* storage refused (private mode): the key lasts this page only */
      }
      memoryKey = key;
    },
  };
  let memoryKey = store.get();

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (memoryKey) headers.Authorization = `Bearer ${memoryKey}`;
    return headers;
  }

  class ApiError extends Error {
    constructor(status, code, message, path) {
      super(message);
      this.status = status;
      this.code = code;
      this.path = path;
    }
  }

  async function errorFrom(res, path) {
    let body = null;
    try {
      body = await res.json();
    } catch {
      /* not JSON (a proxy's page) */
    }
    const code = (body && body.error) || `http_${res.status}`;
    return new ApiError(res.status, code, (body && body.message) || res.statusText || code, path);
  }

  async function api(path, method = "GET", signal) {
    let res;
    try {
      const post = method === "POST";
      res = await fetch(path, {
        method,
        headers: authHeaders(post ? { Accept: "application/json", "Content-Type": "application/json" } : { Accept: "application/json" }),
        body: post ? "{}" : undefined,
        cache: "no-store",
        signal,
      });
    } catch (exc) {
      if (exc && exc.name === "AbortError") throw exc;
      throw new ApiError(0, "network", "cannot reach the worker", path);
    }
    if (!res.ok) throw await errorFrom(res, path);
    return res.json();
  }

  // ---- banner and key form -----------------------------------------------------------

  const notices = new Map(); // source -> { text, kind }
  /** A line in the banner, by source (a poll's error is replaced by the next poll);
   * ``kind`` "info" for what an action did, "error" otherwise. */
  function notice(source, text, ttlMs, kind = "error") {
    if (text) notices.set(source, { text, kind });
    else notices.delete(source);
    const banner = $("banner");
    banner.replaceChildren(...Array.from(notices.values(), (n) => el("div", { className: `note ${n.kind}` }, n.text)));
    banner.hidden = notices.size === 0;
    if (text && ttlMs) {
      setTimeout(() => {
        const current = notices.get(source);
        if (current && current.text === text) notice(source, null);
      }, ttlMs);
    }
  }

  function describe(err) {
    if (err.status === 0) return "Cannot reach the worker (network down?). Retrying every 2 s.";
    if (err.status === 503) return `Redis unavailable (503 ${err.code}): ${err.message} Retrying every 2 s.`;
    return `${err.path}: ${err.status} ${err.code}: ${err.message}`;
  }

  let authBlocked = false;

  function askForKey(message) {
    authBlocked = true;
    $("auth-message").textContent = message;
    $("auth").hidden = false;
    $("view-dash").hidden = true;
    $("view-task").hidden = true;
    setLive("locked", "key needed");
    $("auth-key").focus();
  }

  /** Handles 401 and 403 (the key form); true when the error was one of them. */
  function authProblem(err) {
    if (err.status === 401) {
      askForKey(
        memoryKey
          ? "That key was refused (401). Enter an admin key."
          : "This worker needs an admin key. It stays in this browser (localStorage) and is sent as Authorization: Bearer.",
      );
      return true;
    }
    if (err.status === 403) {
      askForKey("That key is valid but not an admin key (403): the dashboard needs an admin key.");
      return true;
    }
    return false;
  }

  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("auth-key").value.trim();
    if (!key) return;
    store.set(key);
    $("auth-key").value = "";
    authBlocked = false;
    $("auth").hidden = true;
    updateForget();
    route();
  });

  $("forget").addEventListener("click", (ev) => {
    ev.preventDefault();
    store.set("");
    updateForget();
    route();
  });

  function updateForget() {
    $("forget").hidden = !memoryKey;
  }

  function setLive(state, text) {
    $("live").className = `live ${state}`;
    setText($("live-text"), text);
  }

  // ---- dashboard: polling ------------------------------------------------------------

  let pollTimer = null;
  let inFlight = false;
  let lastStats = null;

  function failuresPath() {
    const params = new URLSearchParams({ limit: "50" });
    for (const select of $("filters").elements) {
      if (select.name && select.value) params.set(select.name, select.value);
    }
    return `/v1/failures?${params}`;
  }

  function schedule(delayMs) {
    clearTimeout(pollTimer);
    pollTimer = setTimeout(poll, delayMs);
  }

  async function poll() {
    pollTimer = null;
    if (inFlight || authBlocked || document.hidden || current.name !== "dash") return;
    inFlight = true;
    const [stats, failures] = await Promise.allSettled([api("/v1/stats"), api(failuresPath())]);
    inFlight = false;
    if (current.name !== "dash") return;
    const errors = [stats, failures].filter((r) => r.status === "rejected").map((r) => r.reason);
    if (errors.some(authProblem)) return;
    if (stats.status === "fulfilled") {
      renderStats(stats.value);
      $("view-dash").hidden = false;
    }
    if (failures.status === "fulfilled") renderFailures(failures.value);
    if (errors.length) {
      notice("poll", Array.from(new Set(errors.map(describe))).join(" "));
      setLive("error", "error");
    } else {
      notice("poll", null);
      setLive("ok", `live · ${clock(new Date())}`);
    }
    schedule(POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(pollTimer);
      if (current.name === "dash") setLive("paused", "paused");
    } else if (current.name === "dash") {
      schedule(0);
    }
  });

  // ---- dashboard: rendering ----------------------------------------------------------

  function renderStats(s) {
    if (s.now) clockSkewMs = Date.parse(s.now) - Date.now() || 0;
    lastStats = s;
    const waiting = Object.values(s.queues || {}).reduce((a, q) => a + (q.waiting || 0), 0);
    const tp = s.throughput || {};
    const sum = (xs) => (xs || []).reduce((a, b) => a + b, 0);
    setText($("k-waiting"), fmtNum(waiting));
    setText($("k-running"), fmtNum(s.running));
    setText($("k-replicas"), fmtNum(s.replicas_alive));
    setText($("k-callbacks"), fmtNum(s.callbacks_waiting));
    setText($("k-ok"), fmtNum(sum(tp.succeeded)));
    const failed = sum(tp.failed);
    setText($("k-failed"), fmtNum(failed));
    $("k-failed").classList.toggle("bad", failed > 0);
    $("k-callbacks").classList.toggle("warn", (s.callbacks_waiting || 0) > 0);
    setText($("tp-ok"), fmtNum(sum(tp.succeeded)));
    setText($("tp-failed"), fmtNum(failed));
    setText($("tp-cancelled"), fmtNum(sum(tp.cancelled)));

    renderLanes(s.lanes || []);
    renderCosts(s.cost_today);
    drawChart(tp);
    renderProviders(s.providers || {});
    renderGuards(s.guards || {});
    renderRunning(s.running_tasks || []);
  }

  function renderLanes(lanes) {
    const tbody = $("lanes").tBodies[0];
    $("lanes-empty").hidden = lanes.length > 0;
    $("lanes").hidden = lanes.length === 0;
    const cols = ["c-lane", "num c-waiting", "num c-oldest", "c-running"];
    syncRows(tbody, lanes, (l) => `${l.tier}|${l.model}`, cols, (tr, l, c) => {
      tr.classList.toggle("idle", !l.waiting && !l.running);
      tr.dataset.lane = `${l.tier}|${l.model}`;
      const held = ((lastStats && lastStats.held) || {})[l.model];
      const circuit = ((lastStats && lastStats.circuits) || {})[l.model];
      const capped = l.cap !== undefined && l.cap < l.limit ? l.cap : null;
      const key = `${l.tier}|${l.model}|${held ? Math.ceil(held) : ""}|${circuit ? circuit.state : ""}|${capped ?? ""}`;
      fill(c[0], key, () => {
        const parts = [el("span", { className: "tier", text: l.tier }), " ", l.model];
        if (held) parts.push(" ", el("span", { className: "held", title: "Its provider asked to wait: no task starts on this model until then." }, `held ${fmtSecs(held)}`));
        if (circuit) parts.push(" ", el("span", { className: "circuit", title: `Its provider refused (${circuit.code}): no calls go out; one probe tells when it works again.` }, `circuit ${circuit.state.replace("_", "-")}`));
        if (capped !== null) parts.push(" ", el("span", { className: "capped", title: "The provider pushed back: its adaptive cap is below MAX." }, `cap ${capped}`));
        return parts;
      });
      setText(c[1], fmtNum(l.waiting));
      const wait = l.oldest_wait_s;
      setText(c[2], wait === null || wait === undefined ? "—" : fmtSecs(wait));
      c[2].className = `num c-oldest${wait >= 120 ? " bad" : wait >= 30 ? " warn" : ""}`;
      // A full lane is busy, not broken; full with tasks waiting is the thing to watch.
      // The limit in force: the adaptive cap where the provider pushed it below MAX.
      const limit = capped !== null ? capped : l.limit;
      const level = limit > 0 && l.running >= limit && l.waiting > 0 ? "backlog" : "";
      fill(c[3], `${l.running}/${limit}/${level}`, () => meter(l.running || 0, limit || 0, level));
    });
  }

  function fmtUsd(x) {
    if (x === null || x === undefined) return "—";
    if (x === 0) return "$0";
    return x < 0.01 ? `$${x.toPrecision(2)}` : `$${x.toFixed(2)}`;
  }

  function renderCosts(today) {
    const lanes = (today && today.lanes) || [];
    setText($("k-cost"), today ? fmtUsd(today.cost_usd) : "–");
    setText($("cost-day"), today ? `${today.day} ${today.timezone}` : "");
    $("costs-empty").hidden = lanes.length > 0;
    $("costs").hidden = lanes.length === 0;
    const cols = ["c-lane", "num", "num", "num", "num"];
    const labels = [null, "runs", "input", "output", "USD"];
    syncRows($("costs").tBodies[0], lanes, (l) => `${l.tier}|${l.model}`, cols, (tr, l, c) => {
      tr.dataset.lane = `${l.tier}|${l.model}`;
      labels.forEach((label, i) => label && c[i].setAttribute("data-label", label));
      fill(c[0], `${l.tier}|${l.model}`, () => [el("span", { className: "tier", text: l.tier }), " ", l.model]);
      setText(c[1], fmtNum(l.attempts));
      const t = l.tokens || {};
      setText(c[2], t.cached_input ? `${fmtNum(t.input)} (${fmtNum(t.cached_input)})` : fmtNum(t.input));
      setText(c[3], fmtNum(t.output));
      const unpriced = l.unpriced_attempts > 0;
      setText(c[4], unpriced && !l.cost_usd ? "no price" : fmtUsd(l.cost_usd) + (unpriced ? " +" : ""));
      c[4].title = unpriced ? `${l.unpriced_attempts} runs of a model without a price (PRICE_<MODEL>)` : "";
    });
  }

  function renderProviders(providers) {
    const rows = Object.entries(providers).map(([model, p]) => Object.assign({ model }, p));
    $("providers-empty").hidden = rows.length > 0;
    $("providers").hidden = rows.length === 0;
    const cols = ["c-model", "num", "num", "num", "num", "num", "num c-dur", "num c-dur"];
    const labels = [null, "ok", "429", "5xx", "timeout", "4xx", "duration", "TTFT"];
    const outcomes = ["ok", "rate_limited", "server_error", "timeout", "client_error"];
    syncRows($("providers").tBodies[0], rows, (p) => p.model, cols, (tr, p, c) => {
      setText(c[0], p.model);
      labels.forEach((label, i) => label && c[i].setAttribute("data-label", label));
      const req = p.requests || {};
      outcomes.forEach((name, i) => {
        const n = req[name] || 0;
        setText(c[i + 1], fmtNum(n));
        c[i + 1].className = `num${i > 0 && n > 0 ? (name === "rate_limited" ? " warn" : " bad") : ""}${n === 0 ? " zero" : ""}${i === 0 ? " okn" : ""}`;
      });
      setText(c[6], `${fmtSecs(p.duration_p50_s)} / ${fmtSecs(p.duration_p95_s)}`);
      setText(c[7], `${fmtSecs(p.ttft_p50_s)} / ${fmtSecs(p.ttft_p95_s)}`);
    });
  }

  function renderGuards(guards) {
    const box = $("guards");
    const sig = JSON.stringify(guards);
    $("guards-empty").hidden = Object.keys(guards).length > 0;
    fill(box, sig, () => {
      const out = [];
      for (const [model, g] of Object.entries(guards)) {
        out.push(el("div", { className: "g-model" }, model));
        if (g.total) out.push(el("div", { className: "g-tier" }, "all tiers"), meter(g.total.in_use, g.total.limit));
        for (const [tier, t] of Object.entries(g.tiers || {})) {
          out.push(el("div", { className: "g-tier" }, el("span", { className: "tier", text: tier })), meter(t.in_use, t.limit));
        }
      }
      return out;
    });
  }

  function renderRunning(tasks) {
    const count = `${tasks.length}${tasks.length >= 50 ? "+" : ""}`;
    setText($("running-count"), tasks.length > 1 ? `${count} tasks, longest first` : "");
    $("running-empty").hidden = tasks.length > 0;
    $("running").hidden = tasks.length === 0;
    const cols = ["c-task", "c-kind", "c-tier", "c-model", "c-user", "num c-run", "num c-att", "c-act"];
    syncRows($("running").tBodies[0], tasks, (t) => `${t.tenant}/${t.id}`, cols, (tr, t, c) => {
      tr.dataset.taskId = t.id;
      fill(c[0], `${t.tenant}/${t.id}`, () => taskLink(t.id, t.tenant));
      setText(c[1], t.kind);
      fill(c[2], t.tier, () => el("span", { className: "tier", text: t.tier }));
      setText(c[3], t.model);
      setText(c[4], t.user);
      c[4].title = t.user || "";
      setText(c[5], fmtSecs(t.run_s));
      setText(c[6], fmtNum(t.attempts));
      c[6].classList.toggle("one", t.attempts <= 1);
      fill(c[7], "cancel", () => cancelButton(t));
    });
  }

  function cancelButton(t) {
    const button = el("button", { className: "btn danger cancel", type: "button", title: "Cancel this task" }, "Cancel");
    let armed = null;
    button.addEventListener("click", async () => {
      if (!armed) {
        // Two clicks: a stray tap must not cancel somebody's task.
        button.textContent = "Sure?";
        button.classList.add("armed");
        armed = setTimeout(() => {
          armed = null;
          button.textContent = "Cancel";
          button.classList.remove("armed");
        }, 3000);
        return;
      }
      clearTimeout(armed);
      button.disabled = true;
      button.textContent = "…";
      try {
        await api(taskPath(t.id, t.tenant), "DELETE");
        button.textContent = "cancelled";
        notice("action", `Cancelled ${t.id}.`, 5000, "info");
        schedule(100);
      } catch (err) {
        if (!authProblem(err)) notice("action", `Cancel ${t.id}: ${err.message}`, 8000);
        button.disabled = false;
        button.textContent = "Cancel";
        button.classList.remove("armed");
        armed = null;
      }
    });
    return button;
  }

  const retried = new Map(); // tenant/id -> the new task's id

  function renderFailures(data) {
    fillFacets(data.facets || {});
    const items = data.failures || [];
    $("failures-empty").hidden = items.length > 0;
    $("failures").hidden = items.length === 0;
    const cols = ["c-task", "c-status", "c-err", "c-model", "c-tier", "c-user", "num c-ago", "num c-att", "c-act"];
    syncRows($("failures").tBodies[0], items, (f) => `${f.tenant}/${f.id}`, cols, (tr, f, c) => {
      const key = `${f.tenant}/${f.id}`;
      tr.dataset.taskId = f.id;
      fill(c[0], key, () => taskLink(f.id, f.tenant));
      fill(c[1], f.status, () => badge(f.status));
      const code = f.error ? f.error.code : "";
      c[2].classList.toggle("none", !f.error);
      fill(c[2], `${code}\u0000${f.error ? f.error.message : ""}`, () =>
        el("span", { className: "code", title: f.error ? f.error.message : "" }, code || "—"),
      );
      setText(c[3], f.model);
      fill(c[4], f.tier, () => el("span", { className: "tier", text: f.tier }));
      setText(c[5], f.user);
      c[5].title = f.user || "";
      setText(c[6], fmtAgo(f.finished_at));
      c[6].title = f.finished_at || "";
      setText(c[7], fmtNum(f.attempts));
      c[7].classList.toggle("one", f.attempts <= 1);
      const done = retried.get(key) || f.retried_as;
      fill(c[8], done ? `retried:${done}` : "retry", () => (done ? retriedLink(done, f.tenant) : retryButton(f, key)));
    });
  }

  function retriedLink(id, tenant) {
    const link = el("a", { className: "mono new-task", href: taskHref(id, tenant), title: `The new task: ${id}` }, id);
    return el("span", { className: "retried" }, "→ ", link);
  }

  function retryButton(f, key) {
    const button = el("button", { className: "btn retry", type: "button", title: "Submit this task again" }, "Retry");
    button.addEventListener("click", async () => {
      button.disabled = true;
      button.textContent = "…";
      try {
        const record = await api(taskPath(f.id, f.tenant, "/retry"), "POST");
        retried.set(key, record.id);
        const row = button.closest("tr");
        if (row) {
          const cell = row.cells[row.cells.length - 1];
          fill(cell, `retried:${record.id}`, () => retriedLink(record.id, f.tenant));
        }
        notice("action", `Retried ${f.id} as ${record.id}.`, 5000, "info");
      } catch (err) {
        if (authProblem(err)) return;
        const why = err.code === "not_finished" ? "it is still queued or running" : err.message;
        notice("action", `Retry ${f.id}: ${why}`, 8000);
        button.disabled = false;
        button.textContent = "Retry";
      }
    });
    return button;
  }

  function fillFacets(facets) {
    for (const select of $("filters").elements) {
      if (!select.name) continue;
      const chosen = select.value;
      const values = Array.from(new Set([...(facets[select.name] || []), chosen].filter(Boolean))).sort();
      const sig = values.join("\u0000");
      if (select.dataset.sig === sig) continue;
      select.dataset.sig = sig;
      select.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
      select.value = chosen; // the choice survives a refill
    }
  }

  $("filters").addEventListener("change", () => schedule(0));

  // ---- the throughput chart ----------------------------------------------------------

  /** The chart's top: round, and with a whole number half way up. */
  function niceMax(n) {
    if (n <= 10) return Math.max(4, Math.ceil(n / 2) * 2);
    const pow = 10 ** Math.floor(Math.log10(n));
    for (const m of [1, 2, 3, 4, 5, 6, 8, 10]) if (m * pow >= n) return m * pow;
    return 10 * pow;
  }

  let chartSig = "";
  function drawChart(tp) {
    const box = $("chart");
    const ok = tp.succeeded || [];
    const failed = tp.failed || [];
    const cancelled = tp.cancelled || [];
    const width = Math.max(240, Math.floor(box.clientWidth));
    const sig = `${width}|${tp.start}|${ok}|${failed}|${cancelled}`;
    if (sig === chartSig) return;
    chartSig = sig;
    const height = 168;
    const pad = { l: 34, r: 4, t: 8, b: 20 };
    const n = ok.length;
    const totals = ok.map((v, i) => v + (failed[i] || 0) + (cancelled[i] || 0));
    const top = niceMax(Math.max(0, ...totals));
    const plotW = width - pad.l - pad.r;
    const plotH = height - pad.t - pad.b;
    const y = (v) => pad.t + plotH - (v / top) * plotH;
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "tp" });
    for (const v of [0, top / 2, top]) {
      root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "gridline" }));
      root.append(svg("text", { x: pad.l - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, fmtNum(v)));
    }
    if (n === 0) {
      box.replaceChildren(root);
      return;
    }
    const step = plotW / n;
    const gap = step > 5 ? 1 : 0;
    const start = Date.parse(tp.start || "");
    const minuteMs = (tp.minute_s || 60) * 1000;
    for (let i = 0; i < n; i++) {
      const x = pad.l + i * step;
      const g = svg("g", { "data-minute": i });
      const label = Number.isNaN(start) ? `minute ${i + 1}` : hhmm(start + i * minuteMs);
      g.append(svg("title", {}, `${label}: ${ok[i]} succeeded, ${failed[i] || 0} failed, ${cancelled[i] || 0} cancelled`));
      g.append(svg("rect", { x, y: pad.t, width: step, height: plotH, class: "hover" }));
      let base = 0;
      for (const [value, cls] of [[ok[i], "ok"], [failed[i] || 0, "fail"], [cancelled[i] || 0, "cancel"]]) {
        if (value > 0) {
          const h = Math.max(1.5, (value / top) * plotH);
          g.append(svg("rect", { x: x + gap / 2, y: y(base) - h, width: Math.max(1, step - gap), height: h, class: cls }));
          base += value;
        }
      }
      root.append(g);
    }
    for (let i = 0; i < n; i += 15) {
      const label = Number.isNaN(start) ? `-${n - i}m` : hhmm(start + i * minuteMs);
      root.append(svg("text", { x: pad.l + i * step, y: height - 5, class: "axis" }, label));
    }
    root.append(svg("text", { x: width - pad.r, y: height - 5, class: "axis", "text-anchor": "end" }, "now"));
    box.replaceChildren(root);
  }

  if (window.ResizeObserver) {
    new ResizeObserver(() => {
      if (lastStats && current.name === "dash") drawChart(lastStats.throughput || {});
    }).observe($("chart"));
  }

  // ---- the task page -----------------------------------------------------------------

  let taskRun = null; // { ctl: AbortController, ... } of the task on screen

  function openTask(id, tenant) {
    if (taskRun) taskRun.ctl.abort();
    const run = { id, tenant, ctl: new AbortController(), lastId: "", done: false, tokens: 0 };
    taskRun = run;
    $("view-task").hidden = false;
    $("t-id").textContent = id;
    $("t-id").title = tenant !== DEFAULT_TENANT ? `tenant ${tenant}` : "";
    setStatus("");
    $("t-fields").replaceChildren();
    $("t-error").hidden = true;
    $("t-output").textContent = "";
    $("t-reasoning").textContent = "";
    $("t-reasoning-box").hidden = true;
    $("t-events").replaceChildren();
    $("t-result").textContent = "";
    setText($("t-tokens"), "");
    setStream("connecting");
    document.title = `${id} · llmworker`;
    loadTask(run);
  }

  async function loadTask(run) {
    try {
      renderRecord(await api(taskPath(run.id, run.tenant), "GET", run.ctl.signal));
    } catch (err) {
      if (run.ctl.signal.aborted) return;
      if (authProblem(err)) return;
      if (err.status === 404) {
        setStream("");
        showTaskError(`No task ${run.id}${run.tenant !== DEFAULT_TENANT ? ` of tenant ${run.tenant}` : ""} (it may have expired).`);
        return;
      }
      notice("task", describe(err));
    }
    follow(run);
  }

  async function refreshRecord(run) {
    try {
      const record = await api(taskPath(run.id, run.tenant), "GET", run.ctl.signal);
      if (!run.done && taskRun === run) renderRecord(record);
    } catch {
      /* the stream carries on; the final record comes with it */
    }
  }

  function setStatus(status) {
    const node = $("t-status");
    node.className = `badge s-${status || "unknown"}`;
    node.textContent = status || "…";
  }

  function setStream(state) {
    const labels = { connecting: "connecting", live: "live", reconnecting: "reconnecting…", ended: "ended", "": "" };
    const node = $("t-stream");
    node.className = `stream-state ${state}`;
    node.textContent = labels[state] ?? state;
    if (current.name === "task") setLive(state === "live" ? "ok" : state === "reconnecting" ? "error" : "idle", state ? `events ${labels[state]}` : "task");
  }

  function showTaskError(text, code) {
    const box = $("t-error");
    box.replaceChildren(code ? el("strong", null, code, ": ") : "", text);
    box.hidden = false;
  }

  /** The record's fields; ``final``: the stream's last event (the output falls back to
   * the result's text when no tokens were streamed). */
  function renderRecord(r, final = false) {
    setStatus(r.status);
    const rows = [
      ["Kind", r.kind],
      ["Model", r.model],
      ["Tier", r.tier],
      ["User", r.user],
      ["Tenant", r.tenant],
      ["Attempts", r.attempts],
      ["Created", fmtTime(r.created_at)],
      ["Started", fmtTime(r.started_at)],
      ["Finished", fmtTime(r.finished_at)],
      ["Queued for", fmtSecs(r.queue_s)],
      ["Ran for", r.status === "running" ? "…" : fmtSecs(r.run_s)],
    ];
    if (r.usage && typeof r.usage === "object") {
      const u = r.usage;
      const parts = [];
      if (u.prompt_tokens !== undefined) parts.push(`${fmtNum(u.prompt_tokens)} in`);
      if (u.completion_tokens !== undefined) parts.push(`${fmtNum(u.completion_tokens)} out`);
      rows.push(["Usage", parts.length ? parts.join(" · ") : JSON.stringify(u)]);
    }
    if (r.idempotency_key) rows.push(["Idempotency key", r.idempotency_key]);
    if (r.callback_url) rows.push(["Callback", r.callback_url]);
    if (r.metadata) rows.push(["Metadata", JSON.stringify(r.metadata)]);
    const list = [];
    for (const [name, value] of rows) {
      if (value === null || value === undefined || value === "") continue;
      list.push(el("div", null, el("dt", null, name), el("dd", null, String(value))));
    }
    for (const [name, ref] of [["Retry of", r.retry_of], ["Retried as", r.retried_as]]) {
      if (ref) list.push(el("div", null, el("dt", null, name), el("dd", null, el("a", { className: "mono", href: taskHref(ref, r.tenant) }, ref))));
    }
    $("t-fields").replaceChildren(...list);
    // While it runs, "Ran for" counts up (from the server's clock, as the record's times).
    const since = Date.parse(r.started_at || "");
    const ran = Array.from($("t-fields").querySelectorAll("dt")).find((dt) => dt.textContent === "Ran for");
    if (ran) ran.nextSibling.dataset.since = r.status === "running" && !Number.isNaN(since) ? String(since) : "";
    tickElapsed();
    // A finished task's empty boxes say so, not "waiting".
    $("t-output").classList.toggle("ended", Boolean(final));
    $("t-result").classList.toggle("ended", Boolean(final));
    if (r.error) showTaskError(r.error.message || "", r.error.code || "error");
    else $("t-error").hidden = true;
    if (r.result !== null && r.result !== undefined) {
      $("t-result").textContent = JSON.stringify(r.result, null, 2);
      if (final && !$("t-output").textContent && r.result && typeof r.result.content === "string") {
        $("t-output").textContent = r.result.content;
      }
    }
  }

  function tickElapsed() {
    for (const node of $("t-fields").querySelectorAll("dd[data-since]")) {
      const since = Number(node.dataset.since);
      if (since) setText(node, `${fmtSecs(Math.max(0, serverNow() - since) / 1000)} so far`);
    }
  }
  setInterval(() => {
    if (current.name === "task" && !document.hidden) tickElapsed();
  }, 1000);

  function logEvent(type, text, id) {
    const list = $("t-events");
    // An event's id starts with the milliseconds Redis stored it at: when it happened,
    // not when this page read it.
    const at = id ? Number(String(id).split("-")[0]) : NaN;
    const stamp = clock(Number.isFinite(at) && at > 0 ? new Date(at) : new Date());
    list.append(el("li", { className: `ev-${type}` }, el("time", null, stamp), el("b", null, type), el("span", null, text)));
    while (list.children.length > 300) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  function onEvent(run, ev) {
    if (ev.id) run.lastId = ev.id;
    let data = null;
    try {
      data = JSON.parse(ev.data);
    } catch {
      data = ev.data;
    }
    switch (ev.event) {
      case "tokens": {
        const text = data && typeof data.text === "string" ? data.text : "";
        $("t-output").append(text);
        run.tokens += (data && data.n) || 1;
        setText($("t-tokens"), `${fmtNum(run.tokens)} tokens streamed`);
        break;
      }
      case "reasoning":
        $("t-reasoning-box").hidden = false;
        $("t-reasoning").append(data && typeof data.text === "string" ? data.text : "");
        break;
      case "status": {
        const st = data && data.status;
        setStatus(st);
        let text = st || "";
        if (data && data.attempts) text += ` · attempt ${data.attempts}`;
        if (data && data.error) text += ` · ${data.error.code || ""} ${data.error.message || ""}`;
        logEvent("status", text, ev.id);
        // The record's timings and attempts changed: read it again (the final one comes
        // as the stream's last event).
        if (!FINAL.has(st)) refreshRecord(run);
        break;
      }
      case "record":
        renderRecord(data, true);
        logEvent("record", `final record: ${data.status}`);
        run.done = true;
        break;
      default:
        logEvent(ev.event, typeof data === "string" ? data : JSON.stringify(data), ev.id);
    }
  }

  /** Reads an SSE body; calls onEvent with {id, event, data} for each event. */
  async function readSSE(body, handle) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let ev = { id: "", event: "", data: [] };
    const line = (raw) => {
      const text = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (text === "") {
        if (ev.data.length || ev.event) handle({ id: ev.id, event: ev.event || "message", data: ev.data.join("\n") });
        ev = { id: "", event: "", data: [] };
        return;
      }
      if (text.startsWith(":")) return; // a comment (": ping")
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "id") ev.id = value;
      else if (field === "event") ev.event = value;
      else if (field === "data") ev.data.push(value);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        line(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
    }
  }

  const sleep = (ms, signal) =>
    new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve();
      });
    });

  /** Follows the task's events to its final record, resuming after a drop. */
  async function follow(run) {
    const signal = run.ctl.signal;
    let delay = 500;
    while (!run.done && !signal.aborted) {
      setStream(run.lastId ? "reconnecting" : "connecting");
      try {
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (run.lastId) headers["Last-Event-ID"] = run.lastId;
        const path = taskPath(run.id, run.tenant, "/events");
        const res = await fetch(path, { headers, cache: "no-store", signal });
        if (!res.ok) throw await errorFrom(res, path);
        setStream("live");
        notice("task", null);
        delay = 500;
        await readSSE(res.body, (ev) => onEvent(run, ev));
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof ApiError) {
          if (authProblem(err)) return;
          if (err.status === 404) {
            showTaskError("The task is gone (expired).");
            setStream("ended");
            return;
          }
          notice("task", describe(err));
        } else {
          notice("task", "The event stream dropped; resuming.");
        }
      }
      if (run.done || signal.aborted) break;
      setStream("reconnecting");
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 10000);
    }
    if (run.done) {
      setStream("ended");
      notice("task", null);
    }
  }

  // ---- routing -----------------------------------------------------------------------

  let current = { name: "" };

  function parseRoute() {
    const hash = location.hash.replace(/^#/, "");
    const m = /^\/tasks\/([^?]+)(?:\?(.*))?$/.exec(hash);
    if (m) {
      const params = new URLSearchParams(m[2] || "");
      let id;
      try {
        id = decodeURIComponent(m[1]);
      } catch {
        id = m[1];
      }
      return { name: "task", id, tenant: params.get("tenant") || DEFAULT_TENANT };
    }
    return { name: "dash" };
  }

  function route() {
    current = parseRoute();
    notice("task", null);
    if (taskRun && current.name !== "task") {
      taskRun.ctl.abort();
      taskRun = null;
    }
    if (authBlocked) return;
    $("auth").hidden = true;
    if (current.name === "task") {
      clearTimeout(pollTimer);
      notice("poll", null);
      $("view-dash").hidden = true;
      openTask(current.id, current.tenant);
    } else {
      $("view-task").hidden = true;
      document.title = "llmworker";
      if (lastStats) $("view-dash").hidden = false;
      chartSig = "";
      setLive("idle", "connecting");
      schedule(0);
    }
  }

  $("find").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const raw = $("find-id").value.trim();
    if (!raw) return;
    // "tenant/id" (as stored) opens that tenant's task.
    const slash = raw.lastIndexOf("/");
    const id = slash >= 0 ? raw.slice(slash + 1) : raw;
    const tenant = slash > 0 ? raw.slice(0, slash) : DEFAULT_TENANT;
    $("find-id").value = "";
    location.hash = taskHref(id, tenant);
  });

  window.addEventListener("hashchange", route);
  updateForget();
  route();
})();
