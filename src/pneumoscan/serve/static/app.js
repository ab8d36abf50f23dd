// pneumoscan web page: upload X-rays, show scores and Grad-CAM overlays, keep a sorted worklist.
// Plain JavaScript, no build step and no external resources: the page must work offline.
"use strict";

(() => {
  const KEY_STORAGE = "pneumoscan.apiKey";
  const CONCURRENCY = 2; // the server has few cores; more parallel uploads only queue there
  const $ = (id) => document.getElementById(id);

  const state = {
    items: [],        // {id, file, name, size, status: queued|running|done|error, result, error, detail, httpStatus}
    nextId: 1,
    selectedId: null,
    card: null,       // GET /v1/model
    running: 0,
    needKey: false,
  };

  // --- API key (session storage: gone when the tab closes) -----------------------------------
  const getKey = () => sessionStorage.getItem(KEY_STORAGE) || "";
  function authHeaders() {
    const key = getKey();
    return key ? { "X-API-Key": key } : {};
  }
  function openKeyDialog() {
    $("key-input").value = getKey();
    const dialog = $("key-dialog");
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  }
  function updateKeyButton() {
    const b = $("key-button");
    b.textContent = getKey() ? "API key ✓" : "API key";
    b.classList.toggle("btn-attention", state.needKey && !getKey());
  }

  // --- model card -----------------------------------------------------------------------------
  async function loadCard() {
    try {
      const res = await fetch("/v1/model", { headers: authHeaders() });
      if (res.status === 401) {
        state.needKey = true;
        $("model-info").textContent = "API key needed to use this server";
        updateKeyButton();
        openKeyDialog();
        return;
      }
      if (!res.ok) throw new Error((await errorOf(res)).detail);
      state.card = await res.json();
      state.needKey = false;
      const c = state.card;
      $("model-info").textContent =
        `${c.architecture} · ${c.image_size} px · threshold ${fmt(c.threshold, 3)} · pneumoscan ${c.pneumoscan_version}`;
      $("model-info").title = `model ${c.name}, sha256 ${c.sha256}`;
      $("footer-card").textContent = c.intended_use;
      const s = c.service || {};
      if (s.max_upload_bytes) {
        $("drop-hint").textContent =
          `PNG, JPEG or DICOM · up to ${mib(s.max_upload_bytes)} each · analysed on this server only`;
      }
      updateKeyButton();
    } catch (e) {
      $("model-info").textContent = `Model unavailable: ${e.message}`;
    }
  }

  // --- queue ----------------------------------------------------------------------------------
  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    const limit = state.card && state.card.service ? state.card.service.max_upload_bytes : null;
    for (const file of files) {
      const item = { id: state.nextId++, file, name: file.name || "unnamed", size: file.size, status: "queued" };
      if (limit && file.size > limit) {
        Object.assign(item, { status: "error", error: "file_too_large",
          detail: `the file is ${mib(file.size)}; the limit is ${mib(limit)}`, file: null });
      }
      state.items.push(item);
      if (state.selectedId === null) state.selectedId = item.id;
    }
    render();
    pump();
  }

  function pump() {
    while (state.running < CONCURRENCY) {
      const next = state.items.find((i) => i.status === "queued");
      if (!next) break;
      next.status = "running";
      state.running++;
      analyse(next).finally(() => {
        state.running--;
        render();
        pump();
      });
    }
    render();
  }

  async function analyse(item) {
    const explain = !(state.card && state.card.service && state.card.service.explanations === false);
    const body = new FormData();
    body.append("file", item.file, item.name);
    try {
      const res = await fetch(`/v1/predict?explain=${explain}`, { method: "POST", body, headers: authHeaders() });
      if (res.ok) {
        item.result = await res.json();
        item.status = "done";
        item.file = null; // nothing kept that is not needed
        return;
      }
      const err = await errorOf(res);
      Object.assign(item, { status: "error", error: err.error, detail: err.detail, httpStatus: res.status });
      if (res.status === 401) {
        state.needKey = true;
        updateKeyButton();
        openKeyDialog();
      }
    } catch (e) {
      Object.assign(item, { status: "error", error: "network", detail: `could not reach the server (${e.message})` });
    }
  }

  async function errorOf(res) {
    try {
      const j = await res.json();
      return { error: j.error || `http_${res.status}`, detail: j.detail || res.statusText };
    } catch {
      return { error: `http_${res.status}`, detail: res.statusText || `HTTP ${res.status}` };
    }
  }

  function retryUnauthorised() {
    for (const i of state.items) {
      if (i.status === "error" && i.httpStatus === 401 && i.file) {
        Object.assign(i, { status: "queued", error: undefined, detail: undefined, httpStatus: undefined });
      }
    }
    pump();
  }

  // --- worklist -------------------------------------------------------------------------------
  const ORDER = { done: 0, running: 1, queued: 2, error: 3 };
  function sortedItems() {
    return [...state.items].sort((a, b) => {
      if (ORDER[a.status] !== ORDER[b.status]) return ORDER[a.status] - ORDER[b.status];
      if (a.status === "done") return b.result.probability - a.result.probability;
      return a.id - b.id;
    });
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function render() {
    const tbody = $("worklist-body");
    tbody.replaceChildren();
    let rank = 0;
    for (const item of sortedItems()) {
      const tr = el("tr", `row row-${item.status}`);
      tr.dataset.id = item.id;
      tr.tabIndex = 0;
      if (item.id === state.selectedId) tr.classList.add("selected");
      tr.setAttribute("aria-selected", item.id === state.selectedId ? "true" : "false");

      tr.append(el("td", "rank", item.status === "done" ? String(++rank) : ""));

      const thumb = el("td", "thumb");
      if (item.status === "done" && item.result.image_png_base64) {
        const img = el("img");
        img.alt = "";
        img.src = pngUrl(item.result.image_png_base64);
        thumb.append(img);
      } else {
        thumb.append(el("span", "thumb-placeholder"));
      }
      tr.append(thumb);

      const name = el("td", "file");
      name.append(el("div", "filename", item.name));
      if (item.status === "error") name.append(el("div", "error-text", item.detail));
      else name.append(el("div", "filesize", mib(item.size)));
      tr.append(name);

      const prob = el("td", "prob");
      if (item.status === "done") {
        const p = item.result.probability;
        prob.append(el("span", "prob-value", pct(p)));
        const bar = el("span", "bar");
        const fill = el("span", `bar-fill ${item.result.prediction ? "pos" : "neg"}`);
        fill.style.width = `${(100 * p).toFixed(1)}%`;
        const tick = el("span", "bar-threshold");
        tick.style.left = `${(100 * item.result.threshold).toFixed(1)}%`;
        tick.title = `threshold ${fmt(item.result.threshold, 3)}`;
        bar.append(fill, tick);
        prob.append(bar);
      }
      tr.append(prob);

      const result = el("td", "result");
      if (item.status === "done") {
        result.append(el("span", `badge ${item.result.prediction ? "badge-pos" : "badge-neg"}`, item.result.label));
      } else if (item.status === "error") {
        result.append(el("span", "badge badge-error", item.httpStatus === 401 ? "Key needed" : "Not analysed"));
      } else {
        result.append(el("span", "status", item.status === "running" ? "Analysing…" : "Waiting"));
        if (item.status === "running") result.prepend(el("span", "spinner"));
      }
      tr.append(result);
      tbody.append(tr);
    }

    const n = state.items.length;
    const done = state.items.filter((i) => i.status === "done");
    const flagged = done.filter((i) => i.result.prediction === 1).length;
    const errors = state.items.filter((i) => i.status === "error").length;
    const pending = n - done.length - errors;
    $("empty").hidden = n > 0;
    $("export-button").disabled = done.length === 0 && errors === 0;
    $("clear-button").disabled = n === 0 || pending > 0;
    const parts = [];
    if (n) parts.push(`${n} image${n === 1 ? "" : "s"}`);
    if (done.length) parts.push(`${flagged} above threshold`);
    if (pending) parts.push(`${pending} in progress`);
    if (errors) parts.push(`${errors} not analysed`);
    if (done.length) parts.push(`bar mark = decision threshold (${pct(done[0].result.threshold)})`);
    $("summary").textContent = parts.join(" · ");
    renderViewer();
  }

  function renderViewer() {
    const item = state.items.find((i) => i.id === state.selectedId);
    const show = (id, on) => { $(id).hidden = !on; };
    if (!item) {
      $("viewer-title").textContent = "No image selected";
      show("viewer-hint", true); show("figures", false); show("facts", false); show("viewer-error", false);
      return;
    }
    $("viewer-title").textContent = item.name;
    show("viewer-hint", item.status !== "done" && item.status !== "error");
    $("viewer-hint").textContent = item.status === "queued" ? "Waiting to be analysed…" : "Analysing…";
    show("viewer-error", item.status === "error");
    $("viewer-error").textContent = item.status === "error" ? `Not analysed: ${item.detail}` : "";
    const r = item.status === "done" ? item.result : null;
    show("figures", Boolean(r && r.image_png_base64));
    show("facts", Boolean(r));
    if (!r) return;
    if (r.image_png_base64) {
      $("viewer-image").src = pngUrl(r.image_png_base64);
      $("viewer-overlay").src = pngUrl(r.overlay_png_base64);
    }
    $("fact-probability").textContent = pct(r.probability);
    $("fact-threshold").textContent = fmt(r.threshold, 3);
    const label = $("fact-label");
    label.replaceChildren(el("span", `badge ${r.prediction ? "badge-pos" : "badge-neg"}`, r.label));
    $("fact-model").textContent = `${r.model.name} · pneumoscan ${r.model.version}`;
    $("fact-model").title = `sha256 ${r.model.sha256}, computed with ${r.model.runtime}`;
  }

  function select(id) {
    state.selectedId = id;
    render();
  }

  // --- CSV export (made in the browser; nothing leaves it) -------------------------------------
  function csvCell(value) {
    let s = value === undefined || value === null ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // a spreadsheet must not run a file name as a formula
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function exportCsv() {
    const rows = [["rank", "filename", "probability", "label", "prediction", "threshold",
      "model", "model_sha256", "error"]];
    let rank = 0;
    for (const i of sortedItems()) {
      if (i.status === "done") {
        const r = i.result;
        rows.push([++rank, i.name, r.probability.toFixed(6), r.label, r.prediction, r.threshold,
          r.model.name, r.model.sha256, ""]);
      } else if (i.status === "error") {
        rows.push(["", i.name, "", "", "", "", "", "", i.detail]);
      }
    }
    const text = rows.map((r) => r.map(csvCell).join(",")).join("\r\n") + "\r\n";
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
    const a = el("a");
    a.href = url;
    a.download = `pneumoscan-worklist-${new Date().toISOString().slice(0, 16).replace(/[:T]/g, "")}.csv`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // --- formatting -----------------------------------------------------------------------------
  const fmt = (x, d) => Number(x).toFixed(d);
  const pct = (p) => `${(100 * p).toFixed(1)} %`;
  const mib = (n) => (n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.max(1, Math.round(n / 1024))} KiB`);
  const pngUrl = (b64) => `data:image/png;base64,${b64}`;

  // --- wiring ---------------------------------------------------------------------------------
  function wire() {
    const zone = $("dropzone");
    const input = $("file-input");
    zone.addEventListener("click", () => input.click());
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    // Dropping anywhere adds the files (and stops the browser from opening them in place).
    window.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) zone.classList.remove("dragging"); });
    window.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      addFiles(e.dataTransfer && e.dataTransfer.files);
    });

    const tbody = $("worklist-body");
    tbody.addEventListener("click", (e) => {
      const tr = e.target.closest("tr");
      if (tr) select(Number(tr.dataset.id));
    });
    tbody.addEventListener("keydown", (e) => {
      const tr = e.target.closest("tr");
      if (!tr) return;
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(Number(tr.dataset.id)); }
      const sibling = e.key === "ArrowDown" ? tr.nextElementSibling : e.key === "ArrowUp" ? tr.previousElementSibling : null;
      if (sibling) {
        e.preventDefault();
        select(Number(sibling.dataset.id));
        tbody.querySelector(`tr[data-id="${sibling.dataset.id}"]`).focus();
      }
    });

    $("export-button").addEventListener("click", exportCsv);
    $("clear-button").addEventListener("click", () => {
      state.items = state.items.filter((i) => i.status === "running" || i.status === "queued");
      state.selectedId = null;
      render();
    });

    $("key-button").addEventListener("click", openKeyDialog);
    $("key-cancel").addEventListener("click", () => $("key-dialog").close());
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("key-dialog").close();
      updateKeyButton();
    });
    $("key-form").addEventListener("submit", () => {
      const key = $("key-input").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      updateKeyButton();
      loadCard().then(retryUnauthorised);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    updateKeyButton();
    render();
    loadCard();
  });
})();
