// The administrators' page: plain JavaScript over the node's REST API, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("dicomnode-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("dicomnode-token", tokenInput.value));

function say(text, ok) {
  const m = $("message");
  m.textContent = text;
  m.className = ok ? "ok" : "error";
}

async function api(method, path, body) {
  const headers = {};
  if (tokenInput.value) headers["Authorization"] = "Bearer " + tokenInput.value;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* plain text, e.g. metrics */ }
  if (!r.ok) {
    const detail = data && data.detail !== undefined ? data.detail : text;
    throw new Error(`${method} ${path}: HTTP ${r.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");

// ------------------------------------------------------------------ tabs
let current = "studies";
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button, .tab").forEach((e) => e.classList.remove("active"));
  b.classList.add("active");
  $(b.dataset.tab).classList.add("active");
  current = b.dataset.tab;
  refresh();
}));

// ------------------------------------------------------------------ studies
async function loadStudies() {
  const rows = await api("GET", "/studies?limit=200");
  const body = $("study-rows");
  body.replaceChildren();
  for (const s of rows) {
    const tr = body.insertRow();
    tr.className = "clickable";
    cell(tr, s.ID, "uid"); cell(tr, s.CountSeries); cell(tr, s.CountInstances);
    cell(tr, (s.Bytes / 1e6).toFixed(1)); cell(tr, when(s.LastReceived));
    tr.addEventListener("click", () => showStudy(s.ID));
  }
}

async function showStudy(uid) {
  const s = await api("GET", "/studies/" + uid);
  const div = $("study-detail");
  div.replaceChildren();
  const h = document.createElement("h2");
  h.textContent = "Series of study " + uid;
  const table = document.createElement("table");
  table.createTHead().innerHTML = "<tr><th>Series Instance UID</th><th>modality</th><th>description</th><th>instances</th><th>from</th><th></th></tr>";
  const body = table.createTBody();
  for (const se of s.Series) {
    const tr = body.insertRow();
    cell(tr, se.ID, "uid"); cell(tr, se.MainDicomTags.Modality); cell(tr, se.MainDicomTags.SeriesDescription);
    cell(tr, se.CountInstances); cell(tr, se.CallingAet);
    const b = document.createElement("button");
    b.textContent = "dry run";
    b.addEventListener("click", () => { $("dry-input").value = se.ID; document.querySelector('nav [data-tab="rules"]').click(); runDry(); });
    tr.insertCell().append(b);
  }
  div.append(h, table);
}

// ------------------------------------------------------------------ jobs
async function loadJobs() {
  const rows = await api("GET", "/jobs?limit=200");
  const body = $("job-rows");
  body.replaceChildren();
  for (const j of rows) {
    const tr = body.insertRow();
    tr.dataset.job = j.ID;
    cell(tr, j.ID); cell(tr, j.Type); cell(tr, j.Pipeline || j.Destination); cell(tr, j.Rule);
    cell(tr, j.State, "state state-" + j.State); cell(tr, `${j.Attempts}/${j.MaxAttempts}`);
    cell(tr, j.Seconds); cell(tr, when(j.CompletionTime));
    cell(tr, j.Error || (j.Result ? JSON.stringify(j.Result) : ""));
    const actions = tr.insertCell();
    if (j.Type === "process" && j.State === "done" && j.Result && j.Result.outputs > 0) {
      const b = document.createElement("button");
      b.textContent = "preview";
      b.addEventListener("click", () => showPreview(j));
      actions.append(b);
    }
    if (j.State === "dead" || j.State === "failed") {
      const b = document.createElement("button");
      b.textContent = "resubmit";
      b.addEventListener("click", () => act(() => api("POST", `/jobs/${j.ID}/resubmit`), `job ${j.ID} queued again`));
      actions.append(b);
    }
  }
}

function showPreview(j) {
  const fig = $("preview");
  fig.hidden = false;
  fig.querySelector("img").src = `/jobs/${j.ID}/preview.png`;
  fig.querySelector("figcaption").textContent = `job ${j.ID}: ${j.Pipeline}, series ${j.SeriesInstanceUID}`;
}

// ------------------------------------------------------------------ rules
let rules = [];
let selected = null;

async function loadRules() {
  const [list, system] = [await api("GET", "/rules"), await api("GET", "/system")];
  rules = list;
  $("rule-mode").textContent = `(rule_mode: ${system.RuleMode})`;
  const ol = $("rule-list");
  ol.replaceChildren();
  rules.forEach((r, i) => {
    const li = document.createElement("li");
    li.textContent = `${r.name} (${r.scope}) → ${r.pipelines.join(", ")}`;
    li.dataset.rule = r.name;
    if (r.name === selected) li.className = "selected";
    li.addEventListener("click", () => editRule(r.name));
    for (const [label, delta] of [["↑", -1], ["↓", 1]]) {
      const b = document.createElement("button");
      b.textContent = label;
      b.title = "move " + (delta < 0 ? "up" : "down");
      b.disabled = i + delta < 0 || i + delta >= rules.length;
      b.addEventListener("click", (ev) => { ev.stopPropagation(); move(i, delta); });
      li.append(b);
    }
    ol.append(li);
  });
}

function editRule(name) {
  selected = name;
  const r = rules.find((x) => x.name === name);
  $("rule-editor").value = JSON.stringify(r, null, 2);
  document.querySelectorAll("#rule-list li").forEach((li) => li.classList.toggle("selected", li.dataset.rule === name));
}

function move(i, delta) {
  const names = rules.map((r) => r.name);
  [names[i], names[i + delta]] = [names[i + delta], names[i]];
  act(() => api("POST", "/rules/order", { names }), "rules reordered");
}

$("rule-new").addEventListener("click", () => {
  selected = null;
  $("rule-editor").value = JSON.stringify({ name: "new-rule", scope: "series", match: { Modality: "MR" }, pipelines: ["spine-seg"], send_to: [] }, null, 2);
});

$("rule-save").addEventListener("click", () => {
  let rule;
  try { rule = JSON.parse($("rule-editor").value); } catch (e) { say("the rule is not valid JSON: " + e.message); return; }
  act(async () => { await api("PUT", "/rules/" + encodeURIComponent(rule.name), rule); selected = rule.name; }, `rule ${rule.name} saved`);
});

$("rule-delete").addEventListener("click", () => {
  if (selected && confirm(`Delete rule ${selected}?`)) act(() => api("DELETE", "/rules/" + encodeURIComponent(selected)), `rule ${selected} deleted`);
});

async function runDry() {
  const text = $("dry-input").value.trim();
  const body = text.startsWith("{") ? { attributes: JSON.parse(text) } : { series_uid: text };
  try {
    const r = await api("POST", "/rules/dry-run", body);
    $("dry-output").textContent = (r.would_run.length ? "would run: " + r.would_run.join(", ") : "no rule matches: stored, not processed")
      + "\n\n" + r.rules.map((x) => `${x.matches ? "✓" : "✗"} ${x.name}: ` + Object.entries(x.conditions).map(([k, v]) => `${k} ${v ? "✓" : "✗"}`).join(", ")).join("\n");
  } catch (e) { say(e.message); }
}
$("dry-run").addEventListener("click", runDry);

// ------------------------------------------------------------------ destinations
async function loadDestinations() {
  const dests = await api("GET", "/modalities");
  const body = $("dest-rows");
  body.replaceChildren();
  for (const [name, d] of Object.entries(dests)) {
    const tr = body.insertRow();
    cell(tr, name); cell(tr, d.url ? d.url : `${d.ae_title}@${d.host}:${d.port}`);
    const actions = tr.insertCell();
    if (!d.url) {
      const b = document.createElement("button");
      b.textContent = "echo";
      b.addEventListener("click", () => act(async () => {
        const r = await api("POST", `/modalities/${name}/echo`);
        return `C-ECHO ${name}: status ${r.Status} in ${r.Seconds} s`;
      }));
      actions.append(b);
    }
    const edit = document.createElement("button");
    edit.textContent = "edit";
    edit.addEventListener("click", () => { $("dest-name").value = name; $("dest-editor").value = JSON.stringify(d); });
    const del = document.createElement("button");
    del.textContent = "delete";
    del.addEventListener("click", () => confirm(`Delete destination ${name}?`) && act(() => api("DELETE", "/modalities/" + name), `destination ${name} deleted`));
    actions.append(edit, del);
  }
}

$("dest-save").addEventListener("click", () => {
  const name = $("dest-name").value.trim();
  let dest;
  try { dest = JSON.parse($("dest-editor").value); } catch (e) { say("the destination is not valid JSON: " + e.message); return; }
  act(() => api("PUT", "/modalities/" + encodeURIComponent(name), dest), `destination ${name} saved`);
});

// ------------------------------------------------------------------ pipelines
async function loadPipelines() {
  const body = $("pipeline-rows");
  body.replaceChildren();
  for (const p of await api("GET", "/pipelines")) {
    const tr = body.insertRow();
    cell(tr, p.Name); cell(tr, p.Device); cell(tr, p.Version); cell(tr, p.Loaded ? "yes" : "no");
    cell(tr, p.Model ? `${p.Model.framework || ""} (commit ${(p.Model.commit || "").slice(0, 8)})` : "");
    cell(tr, p.Model && p.Model.metrics ? JSON.stringify(p.Model.metrics).slice(0, 300) : "");
  }
}

// ------------------------------------------------------------------ refresh
async function act(fn, done) {
  try {
    const text = await fn();
    say(typeof text === "string" ? text : done, true);
  } catch (e) { say(e.message); }
  refresh();
}

const loaders = { studies: loadStudies, jobs: loadJobs, rules: loadRules, destinations: loadDestinations, pipelines: loadPipelines };

async function refresh() {
  try {
    const s = await api("GET", "/system");
    $("system").textContent = `${s.DicomAet} on DICOM port ${s.DicomPort}${s.DicomTls ? " (TLS)" : ""}, version ${s.Version}`;
    await loaders[current]();
  } catch (e) { say(e.message); }
}

refresh();
setInterval(() => { if (current === "studies" || current === "jobs") refresh(); }, 2000);
