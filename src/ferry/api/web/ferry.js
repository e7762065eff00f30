// Ferry's dashboard: plain JavaScript over ferryd's own API (no build step).
// Lists come from the REST API every few seconds; a migration's progress comes
// live from the events websocket (/v1/events); the console is xterm.js over the
// console websocket, which follows the domain when it migrates.
"use strict";

const state = { me: null, hosts: [], domains: [], jobs: new Map(), ended: new Map() };
const HEADERS = { "Content-Type": "application/json", "X-Ferry": "1" };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}
const mib = (b) => b == null ? "-" : (b / 1048576).toFixed(1) + " MiB";

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: HEADERS,
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error && data.error.message) || res.statusText);
  return data;
}

function note(text) {
  document.getElementById("live").textContent = text;
}

// -- hosts and domains -------------------------------------------------------------
function renderHosts() {
  const body = document.querySelector("#hosts tbody");
  body.replaceChildren(...state.hosts.map((h) => {
    const i = h.info || {};
    if (!h.reachable) {
      return el("tr", { id: "host-" + h.name }, el("td", {}, h.name),
                el("td", { class: "unreachable", colspan: "8" }, "unreachable: " + h.error));
    }
    return el("tr", { id: "host-" + h.name }, el("td", {}, h.name), el("td", {}, "up"),
              el("td", {}, i.version), el("td", {}, i.qemu_version), el("td", {}, i.accel),
              el("td", {}, `${i.memory_free} / ${i.memory_total} MiB`),
              el("td", {}, String(i.domains)), el("td", {}, String(h.jobs)),
              el("td", {}, i.maintenance ? "on" : "off"));
  }));
}

function renderDomains() {
  const body = document.querySelector("#domains tbody");
  const peers = state.hosts.filter((h) => h.name !== state.me && h.reachable).map((h) => h.name);
  body.replaceChildren(...state.domains.map(({ host, domain: d }) => {
    const actions = el("td", {});
    if (host === state.me && d.state === "running" && peers.length) {
      const dest = el("select", { class: "dest", "data-domain": d.name },
                      ...peers.map((p) => el("option", { value: p }, p)));
      actions.append(dest, el("button", { class: "migrate", "data-domain": d.name, type: "button",
                                          onclick: () => migrate(d.name, dest.value) },
                              "migrate live"));
    }
    if (d.state === "running" || d.state === "paused") {
      actions.append(" ", el("button", { class: "console", "data-domain": d.name, type: "button",
                                         onclick: () => openConsole(d.name) }, "console"));
    }
    return el("tr", { id: "dom-" + d.name, "data-host": host },
              el("td", {}, d.name), el("td", { class: "host" }, host),
              el("td", { class: "state-" + d.state }, d.state),
              el("td", {}, d.memory + " MiB"), el("td", {}, String(d.vcpus)), actions);
  }));
}

let shown = "";   // what the lists show now: redrawn only when it changes (a choice
                  // being made in a row's select survives the refreshes)
async function refreshLists() {
  try {
    const [hosts, doms] = await Promise.all([api("GET", "/v1/cluster/hosts"),
                                             api("GET", "/v1/cluster/domains")]);
    state.hosts = hosts;
    state.domains = doms.domains;
    const now = JSON.stringify([hosts.map((h) => [h.name, h.reachable, h.error, h.jobs,
                                                   h.info && h.info.domains,
                                                   h.info && h.info.maintenance]),
                                doms.domains]);
    if (now === shown) return;
    shown = now;
    renderHosts();
    renderDomains();
  } catch (e) {
    note("cannot read the cluster: " + e.message);
  }
}

// -- migrations --------------------------------------------------------------------
async function migrate(name, dest) {
  try {
    const job = await api("POST", `/v1/domains/${encodeURIComponent(name)}/migrate`,
                          { dest, mode: "live" });
    state.jobs.set(job.id, job);
    renderJobs();
  } catch (e) {
    alert(`migrating ${name} to ${dest}: ${e.message}`);
  }
}

async function abortJob(id) {
  try { await api("POST", `/v1/jobs/${id}/abort`); }
  catch (e) { alert(`abort ${id}: ${e.message}`); }
}

function jobView(job, ended) {
  const s = job.stats || {};
  const pct = job.state === "completed" ? 100 : (s.progress_pct || 0);
  const parts = [`phase ${job.phase}`];
  if (job.queued) parts.push("queued: " + job.queued);
  if (s.total) {
    parts.push(`${mib(s.transferred)} of ${mib(s.total)}`, `${Math.round(s.mbps || 0)} Mbit/s`,
               `dirty ${mib(s.dirty_rate)}/s`, `remaining ${mib(s.remaining)}`);
  }
  if (s.eta_s != null && job.state === "running") parts.push(`ETA ${Math.round(s.eta_s)} s`);
  if (s.downtime_ms != null) parts.push(`downtime ${s.downtime_ms} ms`);
  const cls = "job" + (job.state === "completed" ? " done" : "")
    + (["failed", "aborted", "lost"].includes(job.state) ? " failed" : "");
  const box = el("div", { class: cls, id: "job-" + job.id, "data-state": job.state,
                          "data-progress": String(Math.round(pct)) },
    el("div", { class: "title" },
       `${job.domain}: ${job.source} → ${job.dest} (${job.mode}, ${job.role}) `,
       el("span", { class: "state-" + job.state }, job.state), " ",
       job.state === "running" && job.role === "source"
         ? el("button", { class: "abort", type: "button", "data-job": job.id }, "abort")
         : ""),
    el("div", { class: "bar" }, el("div", { style: `width: ${pct}%` })),
    el("div", { class: "muted progress" }, `${Math.round(pct)}% · ` + parts.join(" · ")));
  for (const e of (job.escalations || []).slice(-5)) {
    box.append(el("div", { class: "esc" }, `${e.action}: ${e.reason}`));
  }
  if (job.error) box.append(el("div", { class: "esc state-failed" },
                               `${job.error.phase}@${job.error.host}: ${job.error.message}`));
  return box;
}

function renderJobs() {
  const box = document.getElementById("jobs");
  const all = [...state.jobs.values(), ...[...state.ended.values()].map((e) => e.job)];
  if (!all.length) { box.replaceChildren(el("p", { class: "muted" }, "none running")); return; }
  box.replaceChildren(...all.map((j) => jobView(j)));
}

let refreshing = null;   // one refresh at a time: a stale answer never undoes a newer one
function refreshJobs() {
  if (!refreshing) refreshing = readJobs().finally(() => { refreshing = null; });
  return refreshing;
}

async function readJobs() {
  try {
    const jobs = await api("GET", "/v1/jobs");
    const now = new Set(jobs.map((j) => j.id));
    for (const [id] of state.jobs) {
      if (!now.has(id)) {    // it ended: keep its final record in view for a while
        try { state.ended.set(id, { job: await api("GET", `/v1/jobs/${id}`), at: Date.now() }); }
        catch (e) { /* gone */ }
        state.jobs.delete(id);
      }
    }
    for (const j of jobs) { state.jobs.set(j.id, j); state.ended.delete(j.id); }
    for (const [id, e] of state.ended) if (Date.now() - e.at > 120000) state.ended.delete(id);
    renderJobs();
  } catch (e) {
    note("cannot read the jobs: " + e.message);
  }
}

function onEvent(ev) {
  if (ev.kind === "migration.progress" && state.jobs.has(ev.job)) {
    const job = state.jobs.get(ev.job);
    job.phase = ev.phase;
    job.stats = Object.assign({}, job.stats, ev);
    renderJobs();
  } else if (ev.kind && (ev.kind.startsWith("migration.") || ev.kind.startsWith("domain."))) {
    refreshJobs();
    refreshLists();
  }
}

function followEvents() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/events";
  const ws = new WebSocket(url);
  ws.onopen = () => note("live");
  ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { /* not ours */ } };
  ws.onclose = () => { note("reconnecting…"); setTimeout(followEvents, 2000); };
}

// -- the console -------------------------------------------------------------------
let consoleSession = null;

function openConsole(name) {
  if (consoleSession) consoleSession.close();
  const panel = document.getElementById("console-panel");
  panel.hidden = false;
  document.getElementById("console-name").textContent = name;
  const target = document.getElementById("terminal");
  target.replaceChildren();
  if (typeof Terminal === "undefined") {
    document.getElementById("console-note").textContent =
      "xterm.js is not installed on this host (scripts/setup.sh installs it)";
    return;
  }
  const term = new Terminal({ cols: 100, rows: 24, convertEol: true });
  term.open(target);
  const session = { name, term, offset: null, ws: null, closed: false };
  const encoder = new TextEncoder();
  term.onData((data) => {
    if (session.ws && session.ws.readyState === WebSocket.OPEN) session.ws.send(encoder.encode(data));
  });
  let tries = 0;
  function connect() {
    if (session.closed) return;
    const from = session.offset === null ? "" : "?from=" + session.offset;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host
      + `/v1/domains/${encodeURIComponent(name)}/console` + from;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    session.ws = ws;
    let first = true;
    ws.onmessage = (m) => {
      if (typeof m.data === "string") {
        if (first) {
          const hello = JSON.parse(m.data);
          session.offset = hello.offset;
          document.getElementById("console-where").textContent = "on " + hello.host;
          first = false;
        }
        return;
      }
      const bytes = new Uint8Array(m.data);
      session.offset += bytes.length;
      term.write(bytes);
    };
    ws.onopen = () => { tries = 0; };
    ws.onclose = (e) => {
      if (session.closed) return;
      // the domain moved (4001): follow it, from where we were; while it is being
      // found on its new host the first tries may fail, so a few more
      if (e.code === 4001 || (session.offset !== null && tries > 0 && tries < 6)) {
        document.getElementById("console-note").textContent = "the domain moved: following it";
        tries += 1;
        setTimeout(connect, 200 * tries);
      } else {
        document.getElementById("console-note").textContent = `console closed (${e.code})`;
      }
    };
  }
  session.close = () => { session.closed = true; if (session.ws) session.ws.close(); term.dispose(); };
  consoleSession = session;
  connect();
  term.focus();
}

// one listener for the abort buttons: the jobs panel is redrawn as progress comes in,
// and a click must not be lost with the button it began on
document.getElementById("jobs").addEventListener("click", (e) => {
  const button = e.target.closest("button.abort");
  if (button) abortJob(button.dataset.job);
});

document.getElementById("console-close").addEventListener("click", () => {
  if (consoleSession) consoleSession.close();
  consoleSession = null;
  document.getElementById("console-panel").hidden = true;
});

(async function main() {
  try {
    const me = await api("GET", "/v1/host");
    state.me = me.name;
    document.getElementById("me").textContent = `host ${me.name} · Ferry ${me.version}`;
  } catch (e) {
    note("cannot reach ferryd: " + e.message);
  }
  await Promise.all([refreshLists(), refreshJobs()]);
  followEvents();
  setInterval(refreshLists, 3000);
  setInterval(refreshJobs, 1000);
})();
