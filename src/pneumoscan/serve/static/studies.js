// pneumoscan web page: the result store's studies (pneumoscan serve --db URL), refreshed periodically.
// Shown only when /v1/health says result_store: true. Grouped like the upload worklist: PNEUMONIA,
// UNSURE and NORMAL most suspicious first (the API's order), flagged ones under "Needs a human".
//
// Fields read from the API:
//   GET /v1/studies      studies: [{id, patient_name, accession_number, study_date, state, n_films,
//                        probability, label, needs_human, read_label}], total
//   GET /v1/studies/{id} films: [{modality, view_position, state, not_scored_reason,
//                        results: [{probability, label, flags: [{code, detail}], model: {name, version}}]}],
//                        reads: [{label, reader, comment, created_at, superseded_by}]
"use strict";

(() => {
  const KEY_STORAGE = "pneumoscan.apiKey"; // shared with app.js (its "API key" button sets it)
  const PAGE = 200;
  const $ = (id) => document.getElementById(id);
  // ?refresh=S sets the period (a wall display may want it faster); 10 s otherwise
  const REFRESH_MS = 1000 * Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 10);

  const GROUPS = [
    { key: "pneumonia", title: "PNEUMONIA", hint: "above the threshold, most suspicious first" },
    { key: "unsure", title: "UNSURE", hint: "in the model's UNSURE band: it does not decide these" },
    { key: "normal", title: "NORMAL", hint: "below the threshold, most suspicious first" },
    { key: "human", title: "Needs a human", hint: "flagged, not assessed, or no film the model could read" },
    { key: "waiting", title: "Waiting", hint: "films still arriving or being scored" },
  ];
  const LABEL_CLASS = { PNEUMONIA: "badge-pos", NORMAL: "badge-neg", UNSURE: "badge-unsure", NOT_ASSESSED: "badge-na" };
  const state = { selected: null, timer: null, sig: "" };

  const headers = () => {
    const key = sessionStorage.getItem(KEY_STORAGE) || "";
    return key ? { "X-API-Key": key } : {};
  };
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function pct(p) {
    if (typeof p !== "number") return "—";
    const x = 100 * p;
    if (x >= 99.95) return "> 99.9 %";
    if (x < 0.05) return "< 0.1 %";
    return `${x.toFixed(1)} %`;
  }
  const nameOf = (s) => (s.patient_name || "(no name)").replace(/\^+/g, ", ").replace(/, $/, "");

  function groupOf(s) {
    if (s.needs_human) return "human";
    if (s.state === "received" || s.state === "scoring" || !s.label) return "waiting";
    return { PNEUMONIA: "pneumonia", UNSURE: "unsure", NORMAL: "normal" }[s.label] || "human";
  }

  function status(text) {
    $("studies-status").textContent = text;
  }

  async function refresh() {
    try {
      const res = await fetch(`/v1/studies?limit=${PAGE}`, { headers: headers() });
      if (res.status === 401) return status("API key needed: set it with the API key button");
      if (!res.ok) return status(`Studies unavailable (HTTP ${res.status})`);
      const body = await res.json();
      render(body.studies, body.total);
      const more = body.total > body.studies.length ? ` · showing ${body.studies.length} of ${body.total}` : "";
      status(`Updated ${new Date().toLocaleTimeString()}${more}`);
    } catch {
      status("Studies unavailable: the server does not answer");
    }
  }

  function headingRow(g, count) {
    const tr = el("tr", `group-row group-${g.key}`);
    tr.dataset.group = g.key;
    const th = el("th");
    th.colSpan = 6;
    th.scope = "colgroup";
    th.append(el("span", "group-title", g.title), el("span", "group-count", ` · ${count}`),
      el("span", "group-hint", ` — ${g.hint}`));
    tr.append(th);
    return tr;
  }

  function studyRow(s, rank, group) {
    const tr = el("tr", `row study-row group-${group}`);
    tr.dataset.id = String(s.id);
    tr.tabIndex = 0;
    if (state.selected === s.id) tr.classList.add("selected");
    const result = el("td");
    result.append(el("span", `badge ${LABEL_CLASS[s.label] || "badge-error"}`, s.label || s.state.replace("_", " ")));
    if (s.read_label) result.append(el("div", "study-read", `Read: ${s.read_label.replace("_", " ")}`));
    tr.append(el("td", "rank", String(rank)), el("td", "study-patient", nameOf(s)),
      el("td", "study-accession", s.accession_number || "—"), el("td", "study-date", s.study_date || "—"),
      el("td", "prob", pct(s.probability)), result);
    return tr;
  }

  // Rows are rebuilt only when the list changed, so a refresh does not take the focus or the
  // row under the pointer away from the reader.
  function render(studies, total) {
    const sig = JSON.stringify([total, studies]);
    if (sig === state.sig) return;
    state.sig = sig;
    const buckets = new Map(GROUPS.map((g) => [g.key, []]));
    for (const s of studies) buckets.get(groupOf(s)).push(s);
    const rows = [];
    let rank = 0;
    for (const g of GROUPS) {
      const items = buckets.get(g.key);
      if (!items.length) continue;
      rows.push(headingRow(g, items.length));
      for (const s of items) rows.push(studyRow(s, ++rank, g.key));
    }
    $("studies-body").replaceChildren(...rows);
    $("studies-empty").hidden = total > 0;
  }

  function filmLine(f) {
    const li = el("li");
    const what = [f.modality, f.view_position].filter(Boolean).join(" ") || "film";
    const r = f.results && f.results.length ? f.results[f.results.length - 1] : null;
    if (!r) {
      li.textContent = `${what}: ${f.state.replace("_", " ")}${f.not_scored_reason ? ` — ${f.not_scored_reason}` : ""}`;
      return li;
    }
    li.append(`${what}: `, el("span", `badge ${LABEL_CLASS[r.label] || "badge-error"}`, r.label),
      ` ${pct(r.probability)} (model ${r.model.name} ${r.model.version})`);
    for (const flag of r.flags || []) li.append(el("div", "flag-detail", `${flag.code.replace(/_/g, " ")}: ${flag.detail}`));
    return li;
  }

  function readLine(r) {
    const when = new Date(r.created_at).toLocaleString();
    const text = `${r.label.replace("_", " ")} by ${r.reader}, ${when}${r.comment ? ` — ${r.comment}` : ""}`;
    return el("li", r.superseded_by === null ? "read-current" : "read-superseded", text);
  }

  async function showStudy(id) {
    state.selected = id;
    for (const tr of document.querySelectorAll("#studies-body tr.row")) {
      tr.classList.toggle("selected", tr.dataset.id === String(id));
    }
    const box = $("study-detail");
    const res = await fetch(`/v1/studies/${id}`, { headers: headers() });
    if (!res.ok) {
      box.replaceChildren(el("p", "error-detail", `Study unavailable (HTTP ${res.status})`));
      box.hidden = false;
      return;
    }
    const d = await res.json();
    const films = el("ul", "study-films");
    films.append(...d.films.map(filmLine));
    const reads = el("ul", "study-reads");
    reads.append(...d.reads.map(readLine));
    box.replaceChildren(el("h3", "", `${nameOf(d.summary)} · ${d.summary.accession_number || "no accession"}`),
      el("h4", "", "Films"), films, el("h4", "", "Reads"),
      d.reads.length ? reads : el("p", "hint", "No read recorded yet."));
    box.hidden = false;
  }

  function wire() {
    const body = $("studies-body");
    body.addEventListener("click", (e) => {
      const tr = e.target.closest("tr.row");
      if (tr) showStudy(Number(tr.dataset.id));
    });
    body.addEventListener("keydown", (e) => {
      const tr = e.target.closest("tr.row");
      if (tr && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); showStudy(Number(tr.dataset.id)); }
    });
    $("key-form").addEventListener("submit", () => setTimeout(refresh, 0));
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  }

  document.addEventListener("DOMContentLoaded", async () => {
    try {
      const res = await fetch("/v1/health");
      if (!res.ok || (await res.json()).result_store !== true) return; // no store: the section stays hidden
    } catch {
      return;
    }
    $("studies").hidden = false;
    wire();
    await refresh();
    state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  });
})();
