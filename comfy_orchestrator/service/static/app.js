// The comfy_orchestrator dashboard: backends, a submit form, and the tenant's jobs followed live over
// WS /v1/events. No framework and no build step. Every text that comes from the service is put in the
// page with textContent or an attribute, never parsed as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "comfy-orchestrator-token";
  const BACKENDS_EVERY_MS = 2000;
  const MAX_JOBS = 200;
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const ACTIVE = new Set(["queued", "running"]);

  const $ = (id) => document.getElementById(id);
  const jobs = new Map(); // job id -> {job, view, outputsShown}
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let socket = null;
  let lastSeq = null; // the highest event seq seen: a reconnect asks for what came after it
  let reconnectDelay = 500;
  let reconnectTimer = null;
  let backendsTimer = null;
  let running = false;

  class Unauthorized extends Error {}

  // ---- HTTP ----------------------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) {
      showLogin("The token was refused.");
      throw new Unauthorized("unauthorized");
    }
    return response;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error) return `${body.error.type}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  function outputPath(jobId, name) {
    const segments = String(name).split("/").map(encodeURIComponent).join("/");
    return `/v1/jobs/${encodeURIComponent(jobId)}/outputs/${segments}`;
  }

  // ---- small DOM helpers ---------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  async function blobImage(path, alt) {
    const response = await api(path);
    if (!response.ok) return el("span", { class: "error", text: `${alt}: ${await errorText(response)}` });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    if (blob.type.startsWith("image/")) return el("img", { src: url, alt, title: alt, loading: "lazy" });
    return el("a", { href: url, download: alt.split("/").pop(), text: alt });
  }

  // ---- login ---------------------------------------------------------------------------------

  function showLogin(message) {
    stop();
    $("main").hidden = true;
    $("forget-token").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function stop() {
    running = false;
    if (backendsTimer !== null) clearInterval(backendsTimer);
    if (reconnectTimer !== null) clearTimeout(reconnectTimer);
    backendsTimer = reconnectTimer = null;
    if (socket !== null) {
      const closing = socket;
      socket = null;
      closing.close();
    }
    setConnection("offline");
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = "";
    jobs.clear();
    $("jobs").replaceChildren();
    $("jobs-empty").hidden = false;
    lastSeq = null;
    showLogin("");
  });

  // ---- backends ------------------------------------------------------------------------------

  function loadBar(value, max) {
    const bar = el("progress", { max: Math.max(max, 1), value });
    return el("span", { class: "load" }, bar, el("span", { text: ` ${value}/${max}` }));
  }

  function renderBackends(items) {
    const rows = items.map((b) => {
      const models = Object.entries(b.models || {}).map(([folder, files]) => `${folder}: ${files.join(", ")}`);
      const health = b.draining ? "draining" : (b.healthy ? "healthy" : "unhealthy");
      const rate = b.success_rate === null || b.success_rate === undefined
        ? "—" : `${Math.round(b.success_rate * 100)}%`;
      return el("tr", { "data-backend": b.name, "data-health": health },
        el("td", { text: b.name }),
        el("td", {}, el("span", { class: `pill ${health}`, text: health })),
        el("td", { text: b.breaker }),
        el("td", {}, loadBar(b.in_flight, b.max_in_flight)),
        el("td", { text: String(b.node_classes ?? "—") }),
        el("td", { class: "models", text: models.join("; ") || "—", title: models.join("\n") }),
        el("td", { text: rate }),
        el("td", { class: "error", text: b.last_error || "" }));
    });
    document.querySelector("#backends tbody").replaceChildren(...rows);
  }

  async function refreshBackends() {
    try {
      const response = await api("/v1/backends");
      if (!response.ok) throw new Error(await errorText(response));
      renderBackends((await response.json()).items);
    } catch (err) {
      if (!(err instanceof Unauthorized)) console.warn("backends:", err);
    }
  }

  // ---- jobs ----------------------------------------------------------------------------------

  function jobView(id) {
    const state = el("span", { class: "state pill" });
    const bar = el("progress", { class: "progress", max: 1, value: 0 });
    const detail = el("span", { class: "detail" });
    const cancel = el("button", { type: "button", class: "cancel", text: "Cancel" });
    cancel.addEventListener("click", () => cancelJob(id, cancel));
    const remove = el("button", { type: "button", class: "delete", text: "Delete", hidden: true });
    remove.addEventListener("click", () => deleteJob(id, remove));
    const root = el("li", { class: "job", "data-job-id": id },
      el("div", { class: "job-head" },
        el("code", { class: "job-id", text: id }), el("span", { class: "kind" }), state,
        el("span", { class: "labels" }), el("span", { class: "created" }), cancel, remove),
      el("div", { class: "job-progress" }, bar, detail),
      el("div", { class: "error job-error" }),
      el("div", { class: "outputs" }));
    return { root, state, bar, detail, cancel, remove };
  }

  function entry(id) {
    let item = jobs.get(id);
    if (item === undefined) {
      item = { job: { id, state: "queued", kind: "", labels: {} }, view: jobView(id), outputsShown: false };
      jobs.set(id, item);
      const list = $("jobs");
      list.prepend(item.view.root);
      while (list.children.length > MAX_JOBS) {
        const last = list.lastElementChild;
        jobs.delete(last.getAttribute("data-job-id"));
        last.remove();
      }
      $("jobs-empty").hidden = true;
    }
    return item;
  }

  function setState(item, state) {
    if (FINAL.has(item.job.state) && !FINAL.has(state)) return; // a final state is never left
    item.job.state = state;
    const { root, state: badge, bar, cancel, remove } = item.view;
    root.setAttribute("data-state", state);
    badge.textContent = state;
    badge.className = `state pill ${state}`;
    cancel.hidden = !ACTIVE.has(state);
    remove.hidden = !FINAL.has(state);
    if (state === "succeeded") bar.value = 1;
    if (state === "queued") bar.value = 0;
    if (state === "running" && bar.value === 0) bar.removeAttribute("value"); // indeterminate until progress
    if (FINAL.has(state) && !bar.hasAttribute("value")) bar.value = 0;
  }

  // An ISO time as microseconds since the epoch (Date.parse stops at milliseconds; the service's
  // times have microseconds, and a job can be created and claimed within one millisecond).
  function micros(iso) {
    const ms = Date.parse(iso);
    if (Number.isNaN(ms)) return NaN;
    const fraction = /\.(\d+)/.exec(iso);
    return Math.floor(ms / 1000) * 1e6 + Number(((fraction ? fraction[1] : "") + "000000").slice(0, 6));
  }

  function applyJob(job) {
    const item = entry(job.id);
    const known = item.job;
    item.job = { ...known, ...job, state: known.state };
    const head = item.view.root.querySelector(".job-head");
    head.querySelector(".kind").textContent = job.kind;
    const labels = Object.entries(job.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    head.querySelector(".labels").textContent = labels;
    head.querySelector(".created").textContent = job.created ? new Date(job.created).toLocaleTimeString() : "";
    if (job.error) item.view.root.querySelector(".job-error").textContent = job.error.message || JSON.stringify(job.error);
    // A record fetched before an event it is answered after (queued, then the running event, then the
    // record) is stale: only a record at least as new as the last state event sets the state.
    const updated = micros(job.updated);
    if (!(item.stateAt > updated)) {
      setState(item, job.state);
      if (!Number.isNaN(updated)) item.stateAt = updated;
    }
    // Only a record that itself says "succeeded" lists every output: a stale one (fetched before the job
    // ended, answered after its final event) must not decide what is shown.
    if (job.state === "succeeded") showOutputs(item, job.outputs);
    return item;
  }

  async function refreshJob(id) {
    const response = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    if (response.ok) applyJob(await response.json());
  }

  async function loadJobs() {
    const response = await api("/v1/jobs?limit=50");
    if (!response.ok) return;
    const page = await response.json();
    for (const job of page.items.slice().reverse()) { // oldest first, so the newest ends on top
      const known = jobs.get(job.id);
      if (known === undefined) applyJob(job);
      else if (!FINAL.has(known.job.state)) refreshJob(job.id);
    }
  }

  async function cancelJob(id, button) {
    button.disabled = true;
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      if (response.ok) applyJob(await response.json());
      else await refreshJob(id); // 409: it ended meanwhile
    } finally {
      button.disabled = false;
    }
  }

  // An ended job goes with its events and outputs (DELETE answers 204, or 404 when it is gone already).
  async function deleteJob(id, button) {
    button.disabled = true;
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
      if (response.ok || response.status === 404) {
        const item = jobs.get(id);
        jobs.delete(id);
        if (item !== undefined) item.view.root.remove();
        $("jobs-empty").hidden = jobs.size > 0;
      } else {
        await refreshJob(id); // 409: it is still running
      }
    } finally {
      button.disabled = false;
    }
  }

  async function showOutputs(item, listed) {
    if (item.outputsShown) return;
    item.outputsShown = true;
    const box = item.view.root.querySelector(".outputs");
    try {
      if (item.job.kind === "pipeline") {
        await showRun(item, box);
        return;
      }
      let names = listed;
      if (names === undefined) { // a record from the job list: it does not name the outputs
        const response = await api(`/v1/jobs/${encodeURIComponent(item.job.id)}`);
        if (!response.ok) throw new Error(await errorText(response));
        names = (await response.json()).outputs || [];
      }
      const figures = await Promise.all(names.map(async (name) =>
        el("figure", {}, await blobImage(outputPath(item.job.id, name), name), el("figcaption", { text: name }))));
      box.replaceChildren(...figures);
    } catch (err) {
      item.outputsShown = false;
      if (!(err instanceof Unauthorized)) box.replaceChildren(el("span", { class: "error", text: String(err) }));
    }
  }

  // A pipeline (comparison) job: GET /v1/runs/{id} gives its cells; models across, step/prompt/seed down,
  // the best score of each row outlined.
  async function showRun(item, box) {
    const id = item.job.id;
    const response = await api(`/v1/runs/${encodeURIComponent(id)}`);
    if (response.status === 404) {
      box.replaceChildren(el("span", { class: "hint", text: "No comparison grid for this job." }));
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const run = await response.json();
    const cells = run.cells || [];
    const models = [...new Set(cells.map((c) => c.model))];
    const rowKey = (c) => JSON.stringify([c.step ?? null, c.prompt, c.seed]);
    const rows = [...new Map(cells.map((c) => [rowKey(c), c])).values()];
    const table = el("table", { class: "grid", "data-run": id },
      el("thead", {}, el("tr", {}, el("th", { text: "step" }), el("th", { text: "prompt" }), el("th", { text: "seed" }),
        ...models.map((m) => el("th", { text: m })))));
    const body = el("tbody");
    for (const row of rows) {
      const inRow = cells.filter((c) => rowKey(c) === rowKey(row));
      const best = Math.max(...inRow.map((c) => (typeof c.score === "number" ? c.score : -Infinity)));
      const tr = el("tr", {}, el("td", { text: row.step ?? "" }), el("td", { class: "prompt", text: row.prompt ?? "" }),
        el("td", { text: row.seed === null || row.seed === undefined ? "" : String(row.seed) }));
      for (const model of models) {
        const cell = inRow.find((c) => c.model === model);
        const td = el("td", { class: "cell", "data-model": model });
        if (cell !== undefined) {
          const score = typeof cell.score === "number" ? cell.score.toFixed(3) : "—";
          if (cell.output) td.append(await blobImage(outputPath(id, cell.output), `${model ?? ""} · ${cell.prompt ?? ""}`));
          td.append(el("div", { class: "score", "data-score": score, text: `score ${score}` }));
          if (typeof cell.score === "number" && cell.score === best) td.classList.add("best");
        }
        tr.append(td);
      }
      body.append(tr);
    }
    table.append(body);
    const parts = [table];
    if (typeof run.grid === "string" && run.grid.startsWith("/v1/")) {
      parts.push(el("figure", { class: "grid-image" }, await blobImage(run.grid, "comparison grid"),
        el("figcaption", { text: "comparison grid" })));
    }
    box.replaceChildren(...parts);
  }

  // ---- events --------------------------------------------------------------------------------

  function setConnection(state) {
    const pill = $("connection");
    pill.setAttribute("data-state", state);
    pill.textContent = `events: ${state}`;
  }

  function onEvent(event) {
    if (lastSeq === null || event.seq > lastSeq) lastSeq = event.seq;
    const known = jobs.has(event.job_id);
    const item = entry(event.job_id);
    const data = event.data || {};
    const type = event.type.startsWith("job.") ? event.type.slice(4) : event.type;
    switch (type) {
      case "queued":
      case "running":
        setState(item, type);
        item.stateAt = Math.max(item.stateAt || 0, micros(event.at) || 0);
        if (data.reason) item.view.detail.textContent = data.reason;
        break;
      case "attempt":
      case "dispatched":
        if (data.backend) item.view.detail.textContent = `on ${data.backend}, attempt ${data.n ?? data.attempt ?? "?"}`;
        break;
      case "progress":
        if (typeof data.fraction === "number") {
          item.view.bar.value = Math.min(Math.max(data.fraction, 0), 1);
          item.view.detail.textContent = `node ${data.node ?? "?"}: ${Math.round(data.fraction * 100)}%`
            + (data.backend ? ` on ${data.backend}` : "");
        }
        break;
      case "retried":
        item.view.detail.textContent = `retrying: ${data.reason ?? ""}`;
        break;
      case "succeeded":
      case "failed":
      case "cancelled":
        setState(item, type);
        item.stateAt = Math.max(item.stateAt || 0, micros(event.at) || 0);
        if (known) refreshJob(event.job_id).catch(() => {}); // its final record: error, outputs
        break;
      default:
        if (event.type.startsWith("pipeline.")) { // step_started, gate, … of a pipeline job
          const what = event.type.slice("pipeline.".length).replace(/_/g, " ");
          item.view.detail.textContent = [what, data.step, data.model, data.reason].filter(Boolean).join(" · ");
        }
        break;
    }
    if (!known) refreshJob(event.job_id).catch(() => {}); // a job submitted elsewhere: fetch its record
  }

  function connectEvents() {
    reconnectTimer = null;
    if (!running) return;
    const params = new URLSearchParams();
    if (lastSeq !== null) params.set("after", String(lastSeq));
    if (token) params.set("token", token); // browsers cannot set headers on a WebSocket
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/v1/events?${params}`);
    socket = ws;
    setConnection("connecting");
    ws.addEventListener("open", () => {
      if (socket !== ws) return;
      reconnectDelay = 500;
      setConnection("live");
      if (lastSeq === null) loadJobs().catch(() => {}); // nothing to replay from: read the list instead
    });
    ws.addEventListener("message", (message) => {
      if (socket === ws) onEvent(JSON.parse(message.data));
    });
    ws.addEventListener("close", () => {
      if (socket !== ws || !running) return;
      socket = null;
      setConnection("reconnecting");
      reconnectTimer = setTimeout(connectEvents, reconnectDelay);
      reconnectDelay = Math.min(reconnectDelay * 2, 10000);
      refreshBackends(); // shows the login again if the token stopped working
    });
  }

  // ---- submit --------------------------------------------------------------------------------

  function parseObject(text, what) {
    const trimmed = text.trim();
    if (!trimmed) return {};
    let value;
    try {
      value = JSON.parse(trimmed);
    } catch (err) {
      throw new Error(`${what} is not valid JSON: ${err.message}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error(`${what} must be a JSON object`);
    return value;
  }

  function mode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      $("template-fields").hidden = mode() !== "template";
      $("graph-fields").hidden = mode() !== "graph";
      $("pipeline-fields").hidden = mode() !== "pipeline";
    });
  }

  $("submit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = $("submit-result");
    result.className = "";
    result.textContent = "submitting…";
    try {
      const body = { labels: parseObject($("labels").value, "labels") };
      if (mode() === "graph") body.graph = parseObject($("graph").value, "the graph");
      else if (mode() === "pipeline") body.pipeline = parseObject($("pipeline").value, "the pipeline");
      else {
        body.template = $("template").value.trim();
        body.params = parseObject($("params").value, "parameters");
      }
      const response = await api("/v1/jobs", {
        method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
      });
      if (!response.ok) throw new Error(await errorText(response));
      const accepted = await response.json();
      result.textContent = `queued ${accepted.id}`;
      result.setAttribute("data-job-id", accepted.id);
      await refreshJob(accepted.id);
    } catch (err) {
      if (err instanceof Unauthorized) return;
      result.className = "error";
      result.textContent = err.message;
    }
  });

  // ---- start ---------------------------------------------------------------------------------

  async function start() {
    stop();
    let response;
    try {
      response = await api("/v1/backends");
    } catch (err) {
      if (!(err instanceof Unauthorized)) showLogin(`The service did not answer: ${err.message}`);
      return;
    }
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget-token").hidden = !token;
    running = true;
    if (response.ok) renderBackends((await response.json()).items);
    backendsTimer = setInterval(refreshBackends, BACKENDS_EVERY_MS);
    connectEvents();
  }

  if (token) start();
  else showLogin("");
})();
