// pneumoscan web page: radiologists' reads of the store's studies, "read first" and shadow mode.
// Kept apart from studies.js (the worklist): it adds to what that file draws.
//
// * A read form under the selected study's detail (#study-detail): NORMAL / PNEUMONIA / not
//   assessable, a comment and the reader's name (remembered in this tab); POST
//   /v1/studies/{id}/read. A second read corrects the first; the history stays listed.
// * "Read first": the AI's result (probability, label, flags) of a study without a read is hidden,
//   in the worklist and in the detail, until a read is saved (against anchoring bias). Shadow mode
//   (GET /v1/shadow, the store's setting) turns it on and it cannot be switched off here.
"use strict";

(() => {
  const KEY_STORAGE = "pneumoscan.apiKey";
  const READER_STORAGE = "pneumoscan.reader";
  const FIRST_STORAGE = "pneumoscan.readFirst";
  const $ = (id) => document.getElementById(id);
  const headers = (json) => {
    const key = sessionStorage.getItem(KEY_STORAGE) || "";
    return Object.assign(json ? { "Content-Type": "application/json" } : {}, key ? { "X-API-Key": key } : {});
  };
  const state = { shadow: false, study: null };

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function readFirst() {
    return state.shadow || sessionStorage.getItem(FIRST_STORAGE) === "1";
  }

  // worklist rows without a read: mark them, so CSS hides their AI result in read-first mode
  function markRows() {
    document.body.classList.toggle("read-first", readFirst());
    for (const tr of document.querySelectorAll("#studies-body tr.study-row")) {
      tr.classList.toggle("unread", !tr.querySelector(".study-read"));
    }
    const box = $("study-detail");
    if (box) box.classList.toggle("unread", !box.querySelector(".study-reads"));
  }

  function readForm(studyId) {
    const form = el("form", "read-form");
    form.id = "read-form";
    const legend = el("h4", "", "Your read");
    const choices = el("div", "read-choices");
    for (const [value, text] of [["NORMAL", "Normal"], ["PNEUMONIA", "Pneumonia"], ["NOT_ASSESSABLE", "Not assessable"]]) {
      const label = el("label", "read-choice");
      const input = el("input");
      input.type = "radio";
      input.name = "label";
      input.value = value;
      input.required = true;
      label.append(input, ` ${text}`);
      choices.append(label);
    }
    const comment = el("textarea");
    comment.name = "comment";
    comment.maxLength = 2000;
    comment.placeholder = "Comment (optional)";
    const reader = el("input");
    reader.name = "reader";
    reader.placeholder = "Your name or code";
    reader.required = true;
    reader.maxLength = 120;
    reader.value = sessionStorage.getItem(READER_STORAGE) || "";
    const save = el("button", "", "Save read");
    save.type = "submit";
    const msg = el("p", "read-status");
    msg.setAttribute("role", "status");
    form.append(legend, choices, comment, reader, save, msg);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const data = new FormData(form);
      sessionStorage.setItem(READER_STORAGE, data.get("reader"));
      const res = await fetch(`/v1/studies/${studyId}/read`, {
        method: "POST", headers: headers(true),
        body: JSON.stringify({ label: data.get("label"), comment: data.get("comment") || null,
                               reader: data.get("reader") }),
      });
      if (!res.ok) {
        msg.textContent = `Not saved (HTTP ${res.status})`;
        return;
      }
      msg.textContent = "Read saved.";
      // studies.js redraws the detail with the read (and the AI result) on the row's click
      const row = document.querySelector(`#studies-body tr[data-id='${studyId}']`);
      if (row) row.click();
    });
    return form;
  }

  function onDetail() {
    const box = $("study-detail");
    const row = document.querySelector("#studies-body tr.selected");
    if (!box || box.hidden || !row || box.querySelector("#read-form")) return markRows();
    box.append(readForm(Number(row.dataset.id)));
    markRows();
  }

  async function loadShadow() {
    try {
      const res = await fetch("/v1/shadow", { headers: headers(false) });
      state.shadow = res.ok && (await res.json()).shadow_mode === true;
    } catch {
      state.shadow = false;
    }
    const box = $("read-first");
    if (box) {
      box.checked = readFirst();
      box.disabled = state.shadow;
      $("read-first-note").textContent = state.shadow ? "shadow mode is on: AI results appear after your read" : "";
    }
    markRows();
  }

  // drift banner: GET /v1/monitor over the recent films; an alert says what it means and what to do
  async function loadMonitor() {
    const section = $("studies");
    let banner = $("drift-banner");
    try {
      const res = await fetch("/v1/monitor", { headers: headers(false) });
      const body = res.ok ? await res.json() : null;
      const alerts = body && body.alert ? body.checks.filter((c) => c.alert) : [];
      if (!alerts.length) {
        if (banner) banner.remove();
        return;
      }
      if (!banner) {
        banner = el("div", "drift-banner");
        banner.id = "drift-banner";
        banner.setAttribute("role", "alert");
        section.prepend(banner);
      }
      banner.replaceChildren(el("strong", "", `Drift alert over the last ${body.n} films: `),
        ...alerts.map((c) => el("p", "", `${c.name.replace(/_/g, " ")}: ${c.meaning}. What to do: ${c.action}.`)));
    } catch {
      /* the monitor is advisory: no banner when it cannot be reached */
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const section = $("studies");
    if (!section) return;
    const bar = el("label", "read-first-toggle");
    const box = el("input");
    box.type = "checkbox";
    box.id = "read-first";
    box.addEventListener("change", () => {
      sessionStorage.setItem(FIRST_STORAGE, box.checked ? "1" : "0");
      markRows();
    });
    bar.append(box, " Read first (hide the AI result until my read is saved) ", el("span", "hint", ""));
    bar.lastChild.id = "read-first-note";
    section.querySelector(".panel-head, h2")?.after(bar);
    new MutationObserver(onDetail).observe(section, { childList: true, subtree: true });
    loadShadow();
    loadMonitor();
    setInterval(() => { loadShadow(); loadMonitor(); }, 30000);
  });
})();
