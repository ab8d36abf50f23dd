// pneumoscan web page: upload X-rays, show scores and Grad-CAM overlays, keep a sorted worklist.
// Plain JavaScript, no build step and no external resources: the page must work offline.
//
// Fields read from the API (all optional ones are used when present and ignored when absent):
//   GET /v1/health   api_key_required: bool
//   GET /v1/model    architecture, image_size, threshold, pneumoscan_version, name, sha256,
//                    intended_use: str, limitations: [str], service.{max_upload_bytes, explanations}
//   POST /v1/predict probability: float, prediction: 0|1, label: NORMAL|PNEUMONIA|UNSURE|NOT_ASSESSED,
//                    threshold: float, model.{name, version, sha256, runtime},
//                    overlay_png_base64, image_png_base64 (explain=true),
//                    optional: logit: float, flags: [str], flag_details: [str] (one per flag) or {flag: str},
//                    cam_scale: "relative"|"absolute", cam_flat: bool
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
    needKey: false,   // from /v1/health (api_key_required) or from a 401
    batch: null,      // {ids: Set, picked: bool}: the images added since the queue was last empty
    pointerInList: false,
    order: [],        // keys of the rows as shown, top to bottom ("g:<group>" for group headings)
    ranks: new Map(), // item id -> rank in the sorted worklist (finished results only)
  };

  // --- worklist groups -------------------------------------------------------------------------
  const GROUPS = [
    { key: "pneumonia", title: "PNEUMONIA", hint: "above the threshold, most suspicious first" },
    { key: "unsure", title: "UNSURE", hint: "in the model's UNSURE band: it does not decide these" },
    { key: "normal", title: "NORMAL", hint: "below the threshold, most suspicious first" },
    { key: "human", title: "Needs a human", hint: "flagged or not assessed by the model" },
    { key: "error", title: "Not analysed", hint: "the file could not be scored" },
    { key: "pending", title: "Pending", hint: "in upload order" },
  ];
  const FLAG_NAMES = {
    not_chest_xray: "Not a chest X-ray?",
    outside_training_population: "Outside the training population",
    low_quality: "Low image quality",
    out_of_distribution: "Unlike the training images",
  };
  const LABEL_CLASS = { PNEUMONIA: "badge-pos", NORMAL: "badge-neg", UNSURE: "badge-unsure", NOT_ASSESSED: "badge-na" };

  const labelOf = (r) => r.label || (r.prediction ? "PNEUMONIA" : "NORMAL");
  const flagsOf = (r) => (Array.isArray(r.flags) ? r.flags.filter((f) => typeof f === "string") : []);
  const notAssessed = (r) => labelOf(r) === "NOT_ASSESSED";
  function flagDetail(r, flag, index) {
    const d = r.flag_details;
    if (Array.isArray(d)) return typeof d[index] === "string" ? d[index] : "";
    if (d && typeof d === "object" && typeof d[flag] === "string") return d[flag];
    return "";
  }
  const flagName = (f) => FLAG_NAMES[f] || f.replace(/_/g, " ");
  function logitOf(r) {
    if (typeof r.logit === "number" && !Number.isNaN(r.logit)) return r.logit;
    const p = Number(r.probability);
    return Math.log(p) - Math.log1p(-p); // ln(p / (1 - p)); +-Infinity at 1 and 0
  }

  function groupOf(item) {
    if (item.status === "queued" || item.status === "running") return "pending";
    if (item.status === "error") return "error";
    const r = item.result;
    const label = labelOf(r);
    if (label === "NOT_ASSESSED" || flagsOf(r).length) return "human";
    if (label === "PNEUMONIA") return "pneumonia";
    if (label === "UNSURE") return "unsure";
    if (label === "NORMAL") return "normal";
    return "human"; // a label this page does not know: a person should look
  }

  const byUpload = (a, b) => a.id - b.id;
  function bySuspicion(a, b) {
    const la = logitOf(a.result);
    const lb = logitOf(b.result);
    return (lb > la) - (lb < la) || a.id - b.id; // ties broken by the logit, then upload order
  }

  // The worklist fully sorted: [{group, items}] in GROUPS order, empty groups left out.
  function grouped() {
    const buckets = new Map(GROUPS.map((g) => [g.key, []]));
    for (const item of state.items) buckets.get(groupOf(item)).push(item);
    for (const key of ["pneumonia", "unsure", "normal"]) buckets.get(key).sort(bySuspicion);
    for (const key of ["human", "error", "pending"]) buckets.get(key).sort(byUpload);
    return GROUPS.map((g) => ({ group: g, items: buckets.get(g.key) })).filter((g) => g.items.length);
  }

  const batchRunning = () => state.items.some((i) => i.status === "queued" || i.status === "running");

  // The order to show. Finished results are sorted, but while a batch runs nothing moves under the
  // user: while the pointer is over the list its order is kept as it is, and the focused and
  // selected rows keep their places. When the batch ends everything is sorted.
  function displayOrder(sortedKeys) {
    if (!batchRunning()) return sortedKeys;
    const known = new Set(sortedKeys);
    const previous = state.order.filter((k) => known.has(k));
    if (state.pointerInList) {
      const shown = new Set(previous);
      // new uploads go to the bottom; a new group heading waits until the pointer leaves
      return previous.concat(sortedKeys.filter((k) => !shown.has(k) && !k.startsWith("g:")));
    }
    const pinned = [];
    const focused = document.activeElement && document.activeElement.closest &&
      document.activeElement.closest("#worklist-body tr.row");
    if (focused) pinned.push(`i:${focused.dataset.id}`);
    if (state.selectedId !== null) pinned.push(`i:${state.selectedId}`);
    const places = [...new Set(pinned)]
      .map((k) => [k, previous.indexOf(k)])
      .filter(([, at]) => at >= 0)
      .sort((a, b) => a[1] - b[1]);
    if (!places.length) return sortedKeys;
    const out = sortedKeys.filter((k) => !places.some(([p]) => p === k));
    for (const [k, at] of places) out.splice(Math.min(at, out.length), 0, k);
    return out;
  }

  // The pinned rows shown away from their sorted place: marked, so that a row held under another
  // group's heading does not read as part of that group.
  function heldKeys(order, sortedKeys) {
    if (order === sortedKeys || state.pointerInList) return new Set();
    const focused = document.activeElement && document.activeElement.closest &&
      document.activeElement.closest("#worklist-body tr.row");
    const pinned = [focused ? `i:${focused.dataset.id}` : null, `i:${state.selectedId}`];
    return new Set(pinned.filter((k) => k && order.indexOf(k) >= 0 && order.indexOf(k) !== sortedKeys.indexOf(k)));
  }

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
    b.hidden = !state.needKey; // no key button on a server that needs none
    b.textContent = getKey() ? "API key ✓" : "API key";
    b.classList.toggle("btn-attention", state.needKey && !getKey());
    $("api-help-key").hidden = !state.needKey;
    renderApiHelp();
  }
  function needKey() {
    state.needKey = true;
    updateKeyButton();
    openKeyDialog();
  }

  // --- health and model card --------------------------------------------------------------------
  async function loadHealth() {
    try {
      const res = await fetch("/v1/health");
      if (!res.ok) return;
      const h = await res.json();
      state.needKey = h.api_key_required === true;
      updateKeyButton();
    } catch {
      // the model card request below says what is wrong
    }
  }

  async function loadCard() {
    if (state.needKey && !getKey()) {
      $("model-info").textContent = "API key needed to use this server";
      openKeyDialog();
      return;
    }
    try {
      const res = await fetch("/v1/model", { headers: authHeaders() });
      if (res.status === 401) {
        $("model-info").textContent = "API key needed to use this server";
        needKey();
        return;
      }
      if (!res.ok) throw new Error((await errorOf(res)).detail);
      state.card = await res.json();
      const c = state.card;
      $("model-info").textContent =
        `${c.architecture} · ${c.image_size} px · threshold ${fmt(c.threshold, 3)} · pneumoscan ${c.pneumoscan_version}`;
      $("model-info").title = `model ${c.name}, sha256 ${c.sha256}`;
      if (c.intended_use) $("footer-card").textContent = c.intended_use;
      renderLimits(c);
      const s = c.service || {};
      if (s.max_upload_bytes) {
        $("drop-hint").textContent =
          `PNG, JPEG, BMP, TIFF, WebP or DICOM · up to ${mib(s.max_upload_bytes)} each · analysed on this server only`;
      }
      updateKeyButton();
    } catch (e) {
      $("model-info").textContent = `Model unavailable: ${e.message}`;
    }
  }

  function renderLimits(card) {
    const limits = Array.isArray(card.limitations) ? card.limitations.filter((x) => typeof x === "string") : [];
    if (!limits.length && !card.intended_use) return;
    $("limits-first").textContent = limits[0] || card.intended_use;
    $("limits-use").textContent = card.intended_use ? `Intended use: ${card.intended_use}` : "";
    $("limits-use").hidden = !card.intended_use;
    $("limits-list").replaceChildren(...limits.map((x) => el("li", "", x)));
    $("limits").hidden = false;
  }

  function renderApiHelp() {
    const origin = location.origin && location.origin !== "null" ? location.origin : "http://SERVER";
    const key = state.needKey ? ' -H "X-API-Key: $PNEUMOSCAN_API_KEY"' : "";
    $("api-example").textContent =
      `curl${key} -F file=@xray.png "${origin}/v1/predict"\n` +
      `curl${key} -F files=@a.png -F files=@b.dcm -F files=@c.jpg "${origin}/v1/predict/batch"`;
  }

  // --- queue ----------------------------------------------------------------------------------
  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    if (!batchRunning()) state.batch = { ids: new Set(), picked: false };
    const limit = state.card && state.card.service ? state.card.service.max_upload_bytes : null;
    for (const file of files) {
      const item = { id: state.nextId++, file, name: file.name || "unnamed", size: file.size, status: "queued" };
      if (limit && file.size > limit) {
        Object.assign(item, { status: "error", error: "file_too_large",
          detail: `the file is ${mib(file.size)}; the limit is ${mib(limit)}`, file: null });
      }
      state.items.push(item);
      state.batch.ids.add(item.id);
    }
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
        pump();
      });
    }
    if (!batchRunning()) finishBatch();
    render();
  }

  // The batch is over: open the most suspicious image, unless the user picked one meanwhile.
  function finishBatch() {
    if (!state.batch || state.batch.done) return;
    state.batch.done = true;
    if (state.batch.picked && state.items.some((i) => i.id === state.selectedId)) return;
    const first = grouped().flatMap((g) => g.items).find((i) => i.status === "done");
    if (first) state.selectedId = first.id;
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
      if (res.status === 401) needKey();
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
    const retry = state.items.filter((i) => i.status === "error" && i.httpStatus === 401 && i.file);
    if (!retry.length) return;
    if (!batchRunning()) state.batch = { ids: new Set(), picked: false };
    for (const i of retry) {
      Object.assign(i, { status: "queued", error: undefined, detail: undefined, httpStatus: undefined });
      state.batch.ids.add(i.id);
    }
    pump();
  }

  // --- worklist -------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const rowNodes = new Map(); // key -> <tr>, reused so focus and hover survive updates

  function headingRow(g, count) {
    const key = `g:${g.key}`;
    let tr = rowNodes.get(key);
    if (!tr) {
      tr = el("tr", `group-row group-${g.key}`);
      tr.dataset.group = g.key;
      rowNodes.set(key, tr);
    }
    const sig = String(count);
    if (tr.dataset.sig !== sig) {
      const th = el("th");
      th.colSpan = 5;
      th.scope = "colgroup";
      th.append(el("span", "group-title", g.title), el("span", "group-count", ` · ${count}`),
        el("span", "group-hint", ` — ${g.hint}`));
      tr.replaceChildren(th);
      tr.dataset.sig = sig;
    }
    return tr;
  }

  function itemRow(item) {
    const key = `i:${item.id}`;
    let tr = rowNodes.get(key);
    if (!tr) {
      tr = el("tr", "row");
      tr.dataset.id = item.id;
      tr.tabIndex = -1;
      rowNodes.set(key, tr);
    }
    const selected = item.id === state.selectedId;
    const rank = state.ranks.get(item.id);
    tr.className = `row row-${item.status} group-${groupOf(item)}${selected ? " selected" : ""}`;
    tr.setAttribute("aria-selected", selected ? "true" : "false");
    tr.tabIndex = selected ? 0 : -1;
    tr.dataset.rank = rank || "";
    const sig = `${item.status}|${item.result ? 1 : 0}|${item.detail || ""}`;
    if (tr.dataset.sig === sig) {
      tr.firstChild.textContent = rank ? String(rank) : ""; // ranks change often: the rest only when the row does
      return tr;
    }
    tr.dataset.sig = sig;
    tr.dataset.probability = item.result ? String(item.result.probability) : "";

    tr.replaceChildren();
    tr.append(el("td", "rank", rank ? String(rank) : ""));

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
    name.title = item.name;
    if (item.status === "error") name.append(el("div", "error-text", item.detail));
    else if (item.status === "done" && flagsOf(item.result).length) {
      const chips = el("div", "flags");
      flagsOf(item.result).forEach((f, n) => {
        const chip = el("span", "flag", `⚠ ${flagName(f)}`);
        const why = flagDetail(item.result, f, n);
        if (why) chip.title = why;
        chips.append(chip);
      });
      name.append(chips);
    } else name.append(el("div", "filesize", mib(item.size)));
    tr.append(name);

    const prob = el("td", "prob");
    if (item.status === "done") {
      const r = item.result;
      const p = Number(r.probability);
      const na = notAssessed(r);
      const value = el("span", `prob-value${na ? " not-meaningful" : ""}`, pct(p));
      value.title = `probability ${p.toPrecision(6)} · logit ${fmt(logitOf(r), 2)}`;
      prob.append(value);
      if (na) prob.append(el("span", "na-note", "not meaningful"));
      else {
        const bar = el("span", "bar");
        const fill = el("span", `bar-fill ${labelOf(r) === "PNEUMONIA" ? "pos" : "neg"}`);
        fill.style.width = `${(100 * p).toFixed(1)}%`;
        const tick = el("span", "bar-threshold");
        tick.style.left = `${(100 * r.threshold).toFixed(1)}%`;
        tick.title = `threshold ${fmt(r.threshold, 3)}`;
        bar.append(fill, tick);
        prob.append(bar);
      }
    }
    tr.append(prob);

    const result = el("td", "result");
    if (item.status === "done") {
      result.append(labelBadge(item.result));
    } else if (item.status === "error") {
      result.append(el("span", "badge badge-error", item.httpStatus === 401 ? "Key needed" : "Not analysed"));
    } else {
      result.append(el("span", "status", item.status === "running" ? "Analysing…" : "Waiting"));
      if (item.status === "running") result.prepend(el("span", "spinner"));
    }
    tr.append(result);
    return tr;
  }

  function labelBadge(r) {
    const label = labelOf(r);
    return el("span", `badge ${LABEL_CLASS[label] || "badge-na"}`, label.replace(/_/g, " "));
  }

  function render() {
    const groups = grouped();
    state.ranks = new Map();
    let rank = 0;
    for (const g of groups) for (const i of g.items) if (i.status === "done") state.ranks.set(i.id, ++rank);

    const nodes = new Map();
    const sortedKeys = [];
    for (const g of groups) {
      const key = `g:${g.group.key}`;
      nodes.set(key, headingRow(g.group, g.items.length));
      sortedKeys.push(key);
      for (const i of g.items) {
        nodes.set(`i:${i.id}`, itemRow(i));
        sortedKeys.push(`i:${i.id}`);
      }
    }
    const order = displayOrder(sortedKeys);
    state.order = order;
    const held = heldKeys(order, sortedKeys);
    for (const [key, tr] of nodes) {
      if (!key.startsWith("i:")) continue;
      tr.classList.toggle("held", held.has(key));
      if (held.has(key)) tr.title = "Held in place while you look at it; it moves to its rank when the batch ends";
      else tr.removeAttribute("title");
    }

    // Put the rows in order, moving only those out of place and never the focused one (moving a
    // node out of the document takes the focus away from it).
    const tbody = $("worklist-body");
    const keep = new Set(order);
    for (const [key, tr] of rowNodes) {
      if (!keep.has(key)) {
        tr.remove();
        if (!nodes.has(key)) rowNodes.delete(key);
      }
    }
    const focused = document.activeElement;
    let prev = null;
    for (const key of order) {
      const tr = nodes.get(key);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want && tr !== focused) tbody.insertBefore(tr, want);
      prev = tr;
    }
    if (!tbody.querySelector("tr.row[tabindex='0']")) {
      const first = tbody.querySelector("tr.row");
      if (first) first.tabIndex = 0; // the list is reachable with Tab even before a row is selected
    }

    renderSummary(groups);
    renderViewer();
  }

  function renderSummary(groups) {
    const n = state.items.length;
    const count = (key) => (groups.find((g) => g.group.key === key) || { items: [] }).items.length;
    const running = batchRunning();
    $("empty").hidden = n > 0;

    const finished = state.items.filter((i) => i.status === "done" || i.status === "error").length;
    const exportBtn = $("export-button");
    const why = $("export-why");
    if (running) {
      exportBtn.disabled = true;
      const total = state.batch ? state.batch.ids.size : n;
      const doneInBatch = state.batch ? state.items.filter((i) => state.batch.ids.has(i.id) &&
        (i.status === "done" || i.status === "error")).length : finished;
      const text = `Export is available when every image is analysed (${doneInBatch} / ${total} so far).`;
      $("export-wrap").title = text;
      exportBtn.title = text;
      why.textContent = text;
    } else {
      exportBtn.disabled = finished === 0;
      const text = finished ? "Download the worklist as a CSV file (made in this browser)" : "Nothing to export yet";
      $("export-wrap").title = text;
      exportBtn.title = text;
      why.textContent = "";
    }
    $("clear-button").disabled = n === 0 || running;

    const progress = $("progress");
    if (state.batch) {
      const total = state.batch.ids.size;
      const done = state.items.filter((i) => state.batch.ids.has(i.id) &&
        (i.status === "done" || i.status === "error")).length;
      progress.hidden = false;
      progress.classList.toggle("finished", !running);
      $("progress-bar").max = Math.max(1, total);
      $("progress-bar").value = done;
      const text = running ? `Analysing: ${done} / ${total} done` : `Finished: ${done} / ${total} analysed`;
      if ($("progress-text").textContent !== text) $("progress-text").textContent = text;
      $("progress-note").textContent = !running ? ""
        : state.pointerInList ? "order held while the pointer is on the list" : "CSV export when all are done";
    } else {
      progress.hidden = true;
    }

    const parts = [];
    for (const [key, word] of [["pneumonia", "PNEUMONIA"], ["unsure", "UNSURE"], ["normal", "NORMAL"],
      ["human", "need a human"], ["error", "not analysed"]]) {
      if (count(key)) parts.push(`${count(key)} ${word}`);
    }
    const firstDone = state.items.find((i) => i.status === "done");
    if (firstDone) parts.push(`bar mark = decision threshold (${pct(firstDone.result.threshold)})`);
    $("summary").textContent = parts.join(" · ");
    $("summary").title = parts.join(" · ");
  }

  function renderViewer() {
    const item = state.items.find((i) => i.id === state.selectedId);
    const show = (id, on) => { $(id).hidden = !on; };
    if (!item) {
      $("viewer-title").textContent = "No image selected";
      show("viewer-hint", true); show("figures", false); show("facts", false); show("viewer-error", false);
      show("viewer-flags", false);
      $("viewer-hint").textContent = batchRunning()
        ? "Analysing… The most suspicious image opens here when all are done; select a row to open one now."
        : "Select a row of the worklist to see the image and where the model looked.";
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
    renderFlags(r);
    if (!r) return;
    if (r.image_png_base64) {
      const img = pngUrl(r.image_png_base64);
      if ($("viewer-image").getAttribute("src") !== img) $("viewer-image").src = img;
      const flat = r.cam_flat === true;
      show("cam-flat", flat);
      show("viewer-overlay", !flat);
      show("colorbar", !flat && Boolean(r.overlay_png_base64));
      if (!flat && r.overlay_png_base64) {
        const overlay = pngUrl(r.overlay_png_base64);
        if ($("viewer-overlay").getAttribute("src") !== overlay) $("viewer-overlay").src = overlay;
      }
      $("cam-scale").textContent = flat ? ""
        : r.cam_scale === "absolute" ? "Colours are absolute: the same scale for every image."
          : "Colours are relative: scaled to this image's maximum.";
    }
    const p = Number(r.probability);
    const probability = $("fact-probability");
    probability.replaceChildren(el("span", notAssessed(r) ? "not-meaningful" : "", pct(p)));
    if (notAssessed(r)) probability.append(el("span", "na-note", " not meaningful: the model did not assess this image"));
    probability.title = `probability ${p.toPrecision(6)} · logit ${fmt(logitOf(r), 2)}`;
    $("fact-threshold").textContent = fmt(r.threshold, 3);
    $("fact-label").replaceChildren(labelBadge(r));
    const rank = state.ranks.get(item.id);
    $("fact-rank").textContent = rank ? `${rank} of ${state.ranks.size}` : "—";
    $("fact-model").textContent = r.model ? `${r.model.name} · pneumoscan ${r.model.version}` : "";
    $("fact-model").title = r.model ? `sha256 ${r.model.sha256}, computed with ${r.model.runtime}` : "";
  }

  function renderFlags(r) {
    const box = $("viewer-flags");
    const flags = r ? flagsOf(r) : [];
    const na = r && notAssessed(r);
    if (!flags.length && !na) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const list = el("ul");
    flags.forEach((f, n) => {
      const li = el("li");
      li.append(el("strong", "", flagName(f)));
      const why = flagDetail(r, f, n);
      if (why) li.append(document.createTextNode(`: ${why}`));
      list.append(li);
    });
    const head = el("p", "flag-head", na ? "Not assessed by the model: a radiologist must read this image."
      : "Flagged: a radiologist must read this image; the score may not apply.");
    box.replaceChildren(head);
    if (flags.length) box.append(list);
    box.hidden = false;
  }

  function select(id, byUser = true) {
    state.selectedId = id;
    if (byUser && state.batch && !state.batch.done) state.batch.picked = true;
    render();
  }

  // Up/Down (or k/j) walk the worklist as it is shown.
  function step(delta) {
    const rows = [...$("worklist-body").querySelectorAll("tr.row")];
    if (!rows.length) return;
    const at = rows.findIndex((tr) => Number(tr.dataset.id) === state.selectedId);
    const next = rows[at < 0 ? 0 : Math.max(0, Math.min(rows.length - 1, at + delta))];
    select(Number(next.dataset.id));
    next.focus();
    next.scrollIntoView({ block: "nearest" });
  }

  // --- CSV export (made in the browser; nothing leaves it) -------------------------------------
  function csvCell(value) {
    let s = value === undefined || value === null ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // a spreadsheet must not run a file name as a formula
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  const two = (n) => String(n).padStart(2, "0");
  function localStamp(d) {
    return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}_` +
      `${two(d.getHours())}-${two(d.getMinutes())}-${two(d.getSeconds())}`;
  }

  function csvText() {
    const rows = [["rank", "filename", "label", "probability", "threshold", "flags", "model_sha256", "error"]];
    for (const g of grouped()) {
      for (const i of g.items) {
        if (i.status === "done") {
          const r = i.result;
          rows.push([state.ranks.get(i.id), i.name, labelOf(r), notAssessed(r) ? "" : r.probability, r.threshold,
            flagsOf(r).join(";"), r.model ? r.model.sha256 : "", ""]);
        } else if (i.status === "error") {
          rows.push(["", i.name, "", "", "", "", "", `${i.error}: ${i.detail}`]);
        } else {
          rows.push(["", i.name, "", "", "", "", "", "not analysed yet"]); // not reached: export waits for the batch
        }
      }
    }
    return rows.map((r) => r.map(csvCell).join(",")).join("\r\n") + "\r\n";
  }

  function exportCsv() {
    if (batchRunning()) return;
    const url = URL.createObjectURL(new Blob([csvText()], { type: "text/csv;charset=utf-8" }));
    const a = el("a");
    a.href = url;
    a.download = `pneumoscan-worklist-${localStamp(new Date())}.csv`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // --- formatting -----------------------------------------------------------------------------
  const fmt = (x, d) => Number(x).toFixed(d);
  function pct(p) {
    const x = 100 * Number(p);
    if (x >= 99.95) return "> 99.9 %"; // never "100.0 %": the model is not certain, and ties hide the order
    if (x < 0.05) return "< 0.1 %";
    return `${x.toFixed(1)} %`;
  }
  const mib = (n) => (n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : `${Math.max(1, Math.round(n / 1024))} KiB`);
  const pngUrl = (b64) => `data:image/png;base64,${b64}`;

  // --- wiring ---------------------------------------------------------------------------------
  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

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
      const tr = e.target.closest("tr.row");
      if (tr) select(Number(tr.dataset.id));
    });
    tbody.addEventListener("keydown", (e) => {
      const tr = e.target.closest("tr.row");
      if (tr && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); select(Number(tr.dataset.id)); }
    });
    // While the pointer is on the list its order holds; leaving it lets the sort catch up.
    tbody.addEventListener("mouseenter", () => {
      state.pointerInList = true;
      if (batchRunning()) renderSummary(grouped());
    });
    tbody.addEventListener("mouseleave", () => { state.pointerInList = false; render(); });
    tbody.addEventListener("focusout", () => setTimeout(() => { if (batchRunning()) render(); }, 0));

    document.addEventListener("keydown", (e) => {
      if (e.altKey || e.ctrlKey || e.metaKey || typing(e.target) || $("key-dialog").open) return;
      const inList = e.target.closest && e.target.closest("#worklist-body");
      const onPage = e.target === document.body || inList;
      if ((e.key === "ArrowDown" && onPage) || e.key === "j") { e.preventDefault(); step(1); }
      else if ((e.key === "ArrowUp" && onPage) || e.key === "k") { e.preventDefault(); step(-1); }
    });

    $("export-button").addEventListener("click", exportCsv);
    $("clear-button").addEventListener("click", () => {
      state.items = state.items.filter((i) => i.status === "running" || i.status === "queued");
      state.selectedId = null;
      state.batch = null;
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

  document.addEventListener("DOMContentLoaded", async () => {
    wire();
    updateKeyButton();
    render();
    await loadHealth(); // first: whether to ask for a key at all
    loadCard();
  });
})();
