// The page of `compsft serve`: pick a language and a task, send text to /v1/predict, show the answer.
// Plain JS, nothing fetched from elsewhere. A query string such as
// ?language=wol&task=dep&text=...&submit=1 fills the form and submits it (the browser test uses it).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message || "";
}

function showError(message) {
  $("error").hidden = false;
  $("error").textContent = message;
  setState("error");
}

function fill(select, values, wanted) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === wanted)));
}

async function loadModels() {
  const params = new URLSearchParams(location.search);
  const res = await fetch("v1/models");
  const models = await res.json();
  fill($("language"), models.languages, params.get("language"));
  fill($("task"), models.tasks, params.get("task"));
  $("base").textContent = `base model ${models.model} · ${models.languages.length} languages × ${models.tasks.length} tasks`;
  if (params.get("text")) $("text").value = params.get("text");
  setState("ready");
  if (params.get("submit")) submit();
}

async function submit(event) {
  if (event) event.preventDefault();
  $("error").hidden = true;
  $("output").replaceChildren();
  const body = {language: $("language").value, task: $("task").value, text: $("text").value};
  setState("busy", "…");
  const started = performance.now();
  let res, data;
  try {
    res = await fetch("v1/predict", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    data = await res.json();
  } catch (err) {
    return showError(`request failed: ${err}`);
  }
  if (!res.ok) return showError(`${res.status} ${data.error_type}: ${data.error}`);
  for (const sentence of data.sentences) $("output").append(renderSentence(sentence, data.task));
  setState("done", `${data.sentences.length} sentence(s) in ${Math.round(performance.now() - started)} ms`);
}

function renderSentence(sentence, task) {
  const box = document.createElement("article");
  box.className = "sentence";
  if (task === "dep") box.append(renderTree(sentence));
  if (task === "ner") box.append(renderEntities(sentence));
  box.append(renderTable(sentence, task));
  return box;
}

function renderTable(sentence, task) {
  const cols = task === "dep" ? ["head", "deprel"] : task === "ner" ? ["ner"] : ["upos"];
  const table = document.createElement("table");
  table.className = "words";
  table.innerHTML = `<thead><tr><th>#</th><th>word</th>${cols.map((c) => `<th>${c}</th>`).join("")}</tr></thead>`;
  const tbody = document.createElement("tbody");
  for (const w of sentence.words) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${w.id}</td><td class="form">${esc(w.form)}</td>` +
      cols.map((c) => `<td class="${c}">${esc(w[c])}</td>`).join("");
    tbody.append(tr);
  }
  table.append(tbody);
  return table;
}

// Entities as <mark> spans over the sentence text, by character offsets (displaCy's ents style).
function renderEntities(sentence) {
  const div = document.createElement("div");
  div.className = "entities";
  const text = sentence.text;
  let at = 0, html = "";
  for (const e of sentence.entities) {
    if (e.start_char === undefined || e.start_char < at) continue;
    html += esc(text.slice(at, e.start_char));
    html += `<mark class="entity" data-label="${esc(e.type)}">${esc(text.slice(e.start_char, e.end_char))}` +
            `<span class="label">${esc(e.type)}</span></mark>`;
    at = e.end_char;
  }
  div.innerHTML = html + esc(text.slice(at));
  if (!sentence.entities.length) div.classList.add("none");
  return div;
}

// The dependency tree as displaCy draws it: words on a line, each arc a curve above them from head to
// dependent, higher for longer arcs, the arrow at the dependent, the relation on top.
function renderTree(sentence) {
  const words = sentence.words, arcs = sentence.arcs;
  const widths = words.map((w) => Math.max(70, 9 * Math.max(w.form.length, String(w.deprel).length) + 24));
  const centers = [];
  let x = 20;
  for (const wd of widths) { centers.push(x + wd / 2); x += wd; }
  const spans = [...new Set(arcs.map((a) => a.end - a.start))].sort((a, b) => a - b);
  const level = (a) => spans.indexOf(a.end - a.start) + 1;
  const step = 38, top = 20 + step * (spans.length || 1);
  const height = top + 60;
  const root = svg("svg", {class: "tree", width: x + 20, height, viewBox: `0 0 ${x + 20} ${height}`,
                           role: "img", "aria-label": "dependency tree"});
  words.forEach((w, i) => {
    const t = svg("text", {x: centers[i], y: top + 28, "text-anchor": "middle", class: "word"}, w.form);
    root.append(t);
  });
  for (const a of arcs) {
    const x1 = centers[a.start] + 6, x2 = centers[a.end] - 6, y = top, peak = top - step * level(a);
    const g = svg("g", {class: "arc", "data-start": a.start, "data-end": a.end, "data-label": a.label, "data-dir": a.dir});
    g.append(svg("path", {d: `M${x1},${y} C${x1},${peak} ${x2},${peak} ${x2},${y}`, fill: "none"}));
    const ax = a.dir === "left" ? x1 : x2;
    g.append(svg("path", {class: "arrow", d: `M${ax},${y + 2} L${ax - 5},${y - 8} L${ax + 5},${y - 8} Z`}));
    // The curve's highest point (t = 0.5 of the cubic) lies at 0.25·y + 0.75·peak.
    g.append(svg("text", {x: (x1 + x2) / 2, y: 0.25 * y + 0.75 * peak - 5, "text-anchor": "middle", class: "label"}, a.label));
    root.append(g);
  }
  const wrap = document.createElement("div");
  wrap.className = "tree-wrap";
  wrap.append(root);
  return wrap;
}

$("form").addEventListener("submit", submit);
loadModels().catch((err) => showError(`cannot read /v1/models: ${err}`));
