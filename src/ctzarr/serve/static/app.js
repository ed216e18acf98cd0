// ctzarr web page: the cohort view and the case view over the service's JSON API.
// Plain JavaScript, no build step, no library: it only asks its own origin (relative URLs).
"use strict";

const API = "api/v1";
const PLANES = ["axial", "coronal", "sagittal"];
const PRESETS = { // OHIF names and values: width, level in HU
  "400,40": "soft tissue", "1500,-600": "lung", "150,90": "liver", "2500,480": "bone", "80,40": "brain",
};

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

const state = {
  collections: [],
  name: null, // collection
  cases: [], // items of the cases endpoint
  sortKey: "case_id",
  sortDir: 1,
  caseId: null,
  detail: null, // case endpoint answer
  rows: [], // stats rows of the case
  plane: "axial",
  index: {}, // plane -> stored index along the plane's normal (unset: the server's middle)
  at: {}, // plane -> structure whose centroid slice to show next (the server picks the index)
  geometry: {}, // plane -> the Ctzarr-Slice header of its last PNG: where the pixels come from
  window: [400, 40],
  overlay: true,
  opacity: 0.5,
  segmentation: null,
  selected: null, // stats row of the selected structure
  imgSeq: 0,
};

// ---------- fetch helpers: problem details become one readable line ----------

async function problem(resp) {
  let text = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && (body.detail || body.title)) text = `${resp.status}: ${body.detail || body.title}`;
  } catch (e) { /* not JSON */ }
  return new Error(text);
}

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" } });
  if (!resp.ok) throw await problem(resp);
  return resp.json();
}

function status(text, isError) {
  const el = $("status");
  el.textContent = text || "";
  el.className = isError ? "error" : "";
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    return value.toFixed(digits === undefined ? 1 : digits);
  }
  if (Array.isArray(value)) return value.map((v) => fmt(v, 2)).join(" × ");
  return String(value);
}

function caseUrl(caseId) { return `${API}/collections/${enc(state.name)}/cases/${enc(caseId)}`; }

// ---------- routing: #/NAME and #/NAME/case/ID ----------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = parts[0] || (state.collections[0] && state.collections[0].name);
  if (!name) { status("no collection is served", true); return; }
  if (parts[1] === "case" && parts[2]) openCase(name, parts[2]);
  else openCohort(name);
}

async function selectCollection(name) {
  if (state.name === name) return;
  state.name = name;
  $("collection-select").value = name;
  state.cases = [];
  const col = state.collections.find((c) => c.name === name) || {};
  state.labelMaps = col.label_maps || {};
  const segs = segmentationNames(col.segmentations);
  fillSelect($("plot-segmentation"), segs);
  $("plot-structure").textContent = "";
  await loadCases();
}

function segmentationNames(segs) {
  if (Array.isArray(segs)) return segs.map((s) => (typeof s === "string" ? s : s.name));
  if (segs && typeof segs === "object") return Object.keys(segs);
  return [];
}

function fillSelect(select, values, labels) {
  const old = select.value;
  select.textContent = "";
  values.forEach((v, i) => {
    const opt = document.createElement("option");
    opt.value = v;
    opt.textContent = labels ? labels[i] : v;
    select.appendChild(opt);
  });
  if (values.includes(old)) select.value = old;
}

// ---------- cohort view ----------

async function loadCases() {
  const items = [];
  const limit = 500;
  for (let offset = 0; ; offset += limit) {
    const page = await getJSON(`${API}/collections/${enc(state.name)}/cases?limit=${limit}&offset=${offset}`);
    items.push(...page.items);
    if (!page.items.length || items.length >= (page.total ?? items.length)) break;
  }
  state.cases = items.map(flattenCase);
}

function flattenCase(item) {
  // metadata may come nested ({metadata: {...}}) or flat beside the fixed fields
  const row = {};
  for (const [key, value] of Object.entries(item)) {
    if (key === "metadata" && value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) row[k] = v;
    } else row[key] = value;
  }
  return row;
}

function caseColumns() {
  const fixed = ["case_id", "shape", "spacing_mm"];
  const extra = new Set();
  for (const row of state.cases) {
    for (const [k, v] of Object.entries(row)) {
      if (!fixed.includes(k) && k !== "orientation" && (v === null || typeof v !== "object")) extra.add(k);
    }
  }
  return fixed.concat([...extra].sort());
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1;
  if (b === null || b === undefined) return -1;
  if (Array.isArray(a) && Array.isArray(b)) {
    const pa = a.reduce((x, y) => x * y, 1), pb = b.reduce((x, y) => x * y, 1);
    return pa - pb;
  }
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function renderCaseTable() {
  const table = $("case-table");
  const cols = caseColumns();
  const head = table.tHead.rows[0];
  head.textContent = "";
  for (const col of cols) {
    const th = document.createElement("th");
    th.textContent = col + (state.sortKey === col ? (state.sortDir > 0 ? " ▲" : " ▼") : "");
    th.dataset.key = col;
    th.setAttribute("data-testid", "case-column");
    th.addEventListener("click", () => {
      state.sortDir = state.sortKey === col ? -state.sortDir : 1;
      state.sortKey = col;
      renderCaseTable();
    });
    head.appendChild(th);
  }
  const needle = $("case-filter").value.trim().toLowerCase();
  const rows = state.cases
    .filter((r) => !needle || cols.some((c) => fmt(r[c]).toLowerCase().includes(needle)))
    .sort((a, b) => state.sortDir * compare(a[state.sortKey], b[state.sortKey]));
  const body = table.tBodies[0];
  body.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.setAttribute("data-testid", "case-row");
    tr.dataset.caseId = r.case_id;
    for (const c of cols) {
      const td = document.createElement("td");
      td.textContent = fmt(r[c], c === "spacing_mm" ? 2 : 1);
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { location.hash = `#/${enc(state.name)}/case/${enc(r.case_id)}`; });
    body.appendChild(tr);
  }
  $("case-count").textContent = `${rows.length} of ${state.cases.length} cases`;
}

async function openCohort(name) {
  try {
    await selectCollection(name);
    $("case-view").hidden = true;
    $("cohort-view").hidden = false;
    $("crumb").textContent = name;
    renderCaseTable();
    if (!$("plot-structure").options.length) await loadStructureChoices();
    else await drawCohortPlot();
    status("");
  } catch (err) { status(err.message, true); }
}

async function loadStructureChoices() {
  // the labels of the segmentation's label map (else those present in the first case)
  const seg = $("plot-segmentation").value;
  if (!state.cases.length || !seg) return;
  const map = state.labelMaps[seg];
  let names;
  if (map && Array.isArray(map.labels)) {
    names = map.labels
      .filter((l) => l.label !== map.background && l.label !== map.ignore_value)
      .map((l) => l.structure);
  } else {
    const url = `${API}/collections/${enc(state.name)}/stats?cases=${enc(state.cases[0].case_id)}&segmentation=${enc(seg)}`;
    names = (await getJSON(url)).items.map((r) => r.structure);
  }
  names = [...new Set(names)].sort();
  const prefer = ["liver", "spleen", "kidney_left"].find((n) => names.includes(n)) || names[0];
  fillSelect($("plot-structure"), names);
  if (prefer) $("plot-structure").value = prefer;
  await drawCohortPlot();
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; lo -= 1; }
  const step0 = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) ticks.push(+t.toFixed(10));
  ticks.digits = Math.max(0, -Math.floor(Math.log10(step))); // decimals that tell ticks apart
  return ticks;
}

function svgEl(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

async function drawCohortPlot() {
  const plot = $("cohort-plot");
  const structure = $("plot-structure").value;
  const seg = $("plot-segmentation").value;
  if (!structure) { plot.textContent = ""; return; }
  const url = `${API}/collections/${enc(state.name)}/stats?structures=${enc(structure)}&segmentation=${enc(seg)}`;
  const rows = (await getJSON(url)).items.filter((r) => r.volume_ml !== null && r.hu_mean !== null);
  plot.textContent = "";
  const W = 520, H = 360, m = { l: 64, r: 16, t: 24, b: 48 };
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  svg.appendChild(svgEl("text", { x: m.l, y: 16, class: "title" }, `${structure}: ${rows.length} case(s)`));
  if (!rows.length) { plot.appendChild(svg); return; }
  const xs = rows.map((r) => r.volume_ml), ys = rows.map((r) => r.hu_mean);
  const pad = (lo, hi) => { const d = (hi - lo) * 0.08 || Math.abs(lo) * 0.1 || 1; return [lo - d, hi + d]; };
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs));
  const [y0, y1] = pad(Math.min(...ys), Math.max(...ys));
  const sx = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
  const sy = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  svg.appendChild(svgEl("rect", { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, class: "frame" }));
  const xt = niceTicks(x0, x1, 5), yt = niceTicks(y0, y1, 5);
  for (const t of xt) {
    svg.appendChild(svgEl("line", { x1: sx(t), x2: sx(t), y1: m.t, y2: H - m.b, class: "grid" }));
    svg.appendChild(svgEl("text", { x: sx(t), y: H - m.b + 16, class: "tick", "text-anchor": "middle" }, t.toFixed(xt.digits)));
  }
  for (const t of yt) {
    svg.appendChild(svgEl("line", { x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.appendChild(svgEl("text", { x: m.l - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end" }, t.toFixed(yt.digits)));
  }
  svg.appendChild(svgEl("text", { x: (W + m.l) / 2, y: H - 10, class: "axis", "text-anchor": "middle" }, "volume (ml)"));
  svg.appendChild(svgEl("text", { x: 14, y: (H - m.b + m.t) / 2, class: "axis", "text-anchor": "middle",
    transform: `rotate(-90 14 ${(H - m.b + m.t) / 2})` }, "HU mean"));
  for (const r of rows) {
    const dot = svgEl("circle", { cx: sx(r.volume_ml), cy: sy(r.hu_mean), r: 5, class: "point",
      "data-testid": "plot-point", "data-case-id": r.case_id });
    dot.appendChild(svgEl("title", {}, `${r.case_id}\n${fmt(r.volume_ml, 1)} ml, ${fmt(r.hu_mean, 1)} HU`));
    dot.addEventListener("click", () => { location.hash = `#/${enc(state.name)}/case/${enc(r.case_id)}`; });
    svg.appendChild(dot);
  }
  plot.appendChild(svg);
}

// ---------- case view ----------

async function openCase(name, caseId) {
  try {
    await selectCollection(name);
    $("cohort-view").hidden = true;
    $("case-view").hidden = false;
    $("crumb").textContent = `${name} / ${caseId}`;
    if (state.caseId !== caseId) await loadCase(caseId);
    status("");
  } catch (err) { status(err.message, true); }
}

async function loadCase(caseId) {
  state.caseId = caseId;
  state.selected = null;
  state.detail = await getJSON(caseUrl(caseId));
  const shape = state.detail.shape;
  state.index = {};
  state.at = {};
  state.geometry = {};
  const segs = segmentationNames(state.detail.segmentations);
  fillSelect($("overlay-segmentation"), segs);
  state.segmentation = $("overlay-segmentation").value || null;
  $("case-title").textContent = caseId;
  const facts = $("case-facts");
  facts.textContent = "";
  const spacing = state.detail.spacing_mm || state.detail.spacing;
  for (const [k, v] of [["shape (z, y, x)", shape], ["spacing mm", spacing], ["segmentations", segs.join(", ")]]) {
    if (v === undefined) continue;
    facts.appendChild(Object.assign(document.createElement("dt"), { textContent: k }));
    facts.appendChild(Object.assign(document.createElement("dd"), { textContent: fmt(v) }));
  }
  $("open-neuroglancer").href = `${caseUrl(caseId)}/neuroglancer`;
  updateCrop();
  state.rows = (await getJSON(`${API}/collections/${enc(state.name)}/stats?cases=${enc(caseId)}`)).items;
  renderStructures();
  renderSlice();
}

function renderStructures() {
  const list = $("structure-list");
  const needle = $("structure-filter").value.trim().toLowerCase();
  list.textContent = "";
  const rows = state.rows
    .filter((r) => r.voxel_count > 0)
    .filter((r) => !needle || String(r.structure).toLowerCase().includes(needle));
  const segs = new Set(state.rows.map((r) => r.segmentation));
  let group = null;
  for (const r of rows) {
    if (segs.size > 1 && r.segmentation !== group) { // a heading per segmentation
      group = r.segmentation;
      list.appendChild(Object.assign(document.createElement("li"), { className: "group", textContent: group }));
    }
    const li = document.createElement("li");
    li.setAttribute("data-testid", "structure-item");
    li.dataset.structure = r.structure;
    li.dataset.segmentation = r.segmentation;
    li.dataset.label = r.label;
    if (state.selected && state.selected.structure === r.structure && state.selected.segmentation === r.segmentation) {
      li.classList.add("selected");
    }
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const rgba = labelColour(r.segmentation, r.label);
    if (rgba) swatch.style.background = `rgb(${rgba[0]},${rgba[1]},${rgba[2]})`;
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: r.structure });
    const nums = Object.assign(document.createElement("span"), {
      className: "nums", textContent: `${fmt(r.volume_ml, r.volume_ml < 10 ? 2 : 1)} ml · ${fmt(r.hu_mean, 0)} HU`,
    });
    li.title = `${r.segmentation} label ${r.label}: ${r.voxel_count} voxels`;
    li.append(swatch, name, nums);
    li.addEventListener("click", () => selectStructure(r));
    list.appendChild(li);
  }
}

function labelColour(seg, label) {
  const found = ((state.detail && state.detail.structures) || [])
    .find((s) => s.segmentation === seg && s.label === label);
  return found ? found.rgba : null;
}

function selectStructure(row) {
  state.selected = row;
  if (row.segmentation && row.segmentation !== state.segmentation) {
    state.segmentation = row.segmentation;
    $("overlay-segmentation").value = row.segmentation;
  }
  // every plane jumps to the slice through the centroid: slice.png?at= answers it from the
  // index (floor(mean index + 0.5), as ctzarr's library does) and says which in its header
  for (const plane of PLANES) state.at[plane] = row.structure;
  $("selected-structure").textContent = `${row.structure} (${row.segmentation})`;
  updateCrop();
  renderStructures();
  renderSlice();
}

function updateCrop() {
  const row = state.selected;
  for (const [id, part] of [["crop-image", "image"], ["crop-labels", "labels"]]) {
    const a = $(id);
    if (!row) { a.removeAttribute("href"); a.classList.add("disabled"); continue; }
    const margin = Math.max(0, Number($("crop-margin").value) || 0);
    a.href = `${caseUrl(state.caseId)}/crop?structure=${enc(row.structure)}&segmentation=${enc(row.segmentation)}`
      + `&margin_mm=${margin}&part=${part}&format=nii.gz`;
    a.download = `${state.caseId}_${row.structure}_${part}.nii.gz`;
    a.classList.remove("disabled");
  }
}

function planeSize(plane) {
  const g = state.geometry[plane];
  return g && state.detail ? state.detail.shape["zyx".indexOf(g.dim)] : 1;
}
function clampIndex(plane, i) { return Math.max(0, Math.min(planeSize(plane) - 1, i)); }

function sliceUrl() {
  const plane = state.plane;
  const p = new URLSearchParams({ plane, window: `${state.window[0]},${state.window[1]}` });
  if (state.at[plane] !== undefined) p.set("at", state.at[plane]);
  else if (state.index[plane] !== undefined) p.set("index", String(state.index[plane]));
  if (state.overlay && state.segmentation) {
    p.set("overlay", state.segmentation);
    if (opacityParam) p.set("opacity", String(state.opacity));
  }
  return `${caseUrl(state.caseId)}/slice.png?${p}`;
}

let pendingObjectUrl = null;
async function renderSlice() {
  if (!state.detail) return;
  const plane = state.plane;
  const key = PRESETS[`${state.window[0]},${state.window[1]}`];
  $("window-select").value = key ? `${state.window[0]},${state.window[1]}` : "custom";
  $("window-value").textContent = `W ${Math.round(state.window[0])} / L ${Math.round(state.window[1])}`;
  $("open-neuroglancer").href = `${caseUrl(state.caseId)}/neuroglancer?window=${enc(`${state.window[0]},${state.window[1]}`)}`;
  const url = sliceUrl();
  const viewer = $("viewer");
  const seq = ++state.imgSeq;
  viewer.dataset.state = "loading";
  try {
    const resp = await fetch(url);
    if (!resp.ok) throw await problem(resp);
    const blob = await resp.blob();
    if (seq !== state.imgSeq) return; // a newer slice was asked for meanwhile
    const geometry = JSON.parse(resp.headers.get("Ctzarr-Slice") || "null");
    if (geometry) {
      state.geometry[plane] = geometry;
      state.index[plane] = geometry.index;
      delete state.at[plane];
    }
    const objectUrl = URL.createObjectURL(blob);
    const img = $("slice-img");
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = objectUrl; });
    if (pendingObjectUrl) URL.revokeObjectURL(pendingObjectUrl);
    pendingObjectUrl = objectUrl;
    if (seq !== state.imgSeq) return;
    showIndex(plane);
    viewer.dataset.src = url;
    viewer.dataset.plane = plane;
    viewer.dataset.state = "ready";
    status("");
  } catch (err) {
    if (seq === state.imgSeq) { viewer.dataset.state = "error"; status(err.message || "slice failed", true); }
  }
}

function showIndex(plane) {
  const n = planeSize(plane), i = state.index[plane];
  const g = state.geometry[plane];
  $("slice-index").textContent = `${g ? g.dim : ""} ${i} / ${n - 1}`;
  $("slice-index").dataset.index = String(i);
  $("slice-number").max = String(n - 1);
  $("slice-number").value = String(i);
}

function moveSlice(delta) {
  const plane = state.plane;
  if (state.index[plane] === undefined) return;
  const next = clampIndex(plane, state.index[plane] + delta);
  if (next !== state.index[plane]) { state.index[plane] = next; renderSlice(); }
}

// hover: the cursor's voxel from the slice's geometry header, world mm from the affine, and
// the voxel's HU and structures from the voxel endpoint (one small JSON answer per pause)
let hoverTimer = null, hoverSeq = 0, voxelEndpoint = true;
function hover(ev) {
  const g = state.geometry[state.plane];
  if (!g || !state.detail || $("viewer").dataset.state !== "ready") return;
  const img = $("slice-img");
  const rect = img.getBoundingClientRect();
  const u = (ev.clientX - rect.left) / rect.width, v = (ev.clientY - rect.top) / rect.height;
  if (!(u >= 0 && u < 1 && v >= 0 && v < 1)) return;
  let row = Math.floor(v * g.voxels[0]), col = Math.floor(u * g.voxels[1]);
  if (g.rows_flipped) row = g.voxels[0] - 1 - row;
  if (g.cols_flipped) col = g.voxels[1] - 1 - col;
  const at = { [g.dim]: g.index, [g.rows_dim]: row, [g.cols_dim]: col };
  const a = state.detail.affine;
  const ijk = [at.x, at.y, at.z];
  const world = [0, 1, 2].map((r) => a[r][0] * ijk[0] + a[r][1] * ijk[1] + a[r][2] * ijk[2] + a[r][3]);
  const el = $("hover-info");
  const where = `voxel (z ${at.z}, y ${at.y}, x ${at.x}) · world (${world.map((w) => w.toFixed(1)).join(", ")}) mm`;
  el.textContent = where;
  el.dataset.voxel = JSON.stringify([at.z, at.y, at.x]);
  delete el.dataset.hu;
  if (!voxelEndpoint) return;
  clearTimeout(hoverTimer);
  hoverTimer = setTimeout(async () => {
    const seq = ++hoverSeq;
    let resp;
    try {
      resp = await fetch(`${caseUrl(state.caseId)}/voxel?z=${at.z}&y=${at.y}&x=${at.x}`);
    } catch (err) { return; }
    if (seq !== hoverSeq) return;
    if (resp.status === 404 || resp.status === 405) {
      voxelEndpoint = false; // a service without the endpoint: position only
      return;
    }
    if (!resp.ok) { el.textContent = `${where} · ${(await problem(resp)).message}`; return; }
    const info = await resp.json();
    const labels = Object.entries(info.labels || {})
      .map(([seg, l]) => `${seg}: ${l.structure || (l.label ? `label ${l.label}` : "–")}`).join(" · ");
    el.textContent = `${where} · ${fmt(info.hu, 0)} HU · ${labels}`;
    el.dataset.hu = String(info.hu);
    el.dataset.huVoxel = JSON.stringify([at.z, at.y, at.x]);
  }, 40);
}

// W/L by drag: right/left widens/narrows the window, up/down raises/lowers the level
let drag = null;
function startDrag(ev) {
  if (ev.button !== 0) return;
  drag = { x: ev.clientX, y: ev.clientY, w: state.window[0], l: state.window[1], moved: false };
  ev.preventDefault();
}
function onDrag(ev) {
  if (!drag) return;
  const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
  if (Math.abs(dx) + Math.abs(dy) < 3) return;
  drag.moved = true;
  state.window = [Math.max(1, drag.w + dx * 4), drag.l - dy * 2];
  $("window-value").textContent = `W ${Math.round(state.window[0])} / L ${Math.round(state.window[1])}`;
}
function endDrag() {
  if (drag && drag.moved) renderSlice();
  drag = null;
}

// ---------- wiring ----------

function wire() {
  $("collection-select").addEventListener("change", (e) => { location.hash = `#/${enc(e.target.value)}`; });
  $("case-filter").addEventListener("input", renderCaseTable);
  $("plot-segmentation").addEventListener("change", () => loadStructureChoices().catch((e) => status(e.message, true)));
  $("plot-structure").addEventListener("change", () => drawCohortPlot().catch((e) => status(e.message, true)));
  $("plane-select").addEventListener("change", (e) => { state.plane = e.target.value; renderSlice(); });
  $("slice-number").addEventListener("change", (e) => {
    state.index[state.plane] = clampIndex(state.plane, Math.round(Number(e.target.value) || 0));
    renderSlice();
  });
  $("window-select").addEventListener("change", (e) => {
    if (e.target.value === "custom") return;
    state.window = e.target.value.split(",").map(Number);
    renderSlice();
  });
  $("overlay-toggle").addEventListener("change", (e) => { state.overlay = e.target.checked; renderSlice(); });
  $("overlay-segmentation").addEventListener("change", (e) => { state.segmentation = e.target.value; renderSlice(); });
  $("overlay-opacity").addEventListener("change", (e) => { state.opacity = Number(e.target.value); renderSlice(); });
  $("crop-margin").addEventListener("change", updateCrop);
  $("structure-filter").addEventListener("input", renderStructures);
  const viewer = $("viewer");
  viewer.addEventListener("wheel", (e) => { e.preventDefault(); moveSlice(e.deltaY > 0 ? -1 : 1); }, { passive: false });
  document.addEventListener("keydown", (e) => {
    if ($("case-view").hidden || ["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) return;
    const step = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10 }[e.key];
    if (step) { e.preventDefault(); moveSlice(step); }
  });
  viewer.addEventListener("mousemove", (e) => { onDrag(e); if (!drag) hover(e); });
  viewer.addEventListener("mousedown", (e) => { viewer.focus(); startDrag(e); });
  window.addEventListener("mouseup", endDrag);
  window.addEventListener("hashchange", route);
}

// what this service offers, from its OpenAPI document: the hover's voxel endpoint and the
// overlay opacity are used only when the service has them
let opacityParam = true;
async function features() {
  try {
    const paths = (await getJSON(`${API}/openapi.json`)).paths || {};
    const find = (suffix) => Object.entries(paths).find(([k]) => k.endsWith(suffix));
    voxelEndpoint = Boolean(find("/voxel"));
    const slice = find("/slice.png");
    const params = (slice && slice[1].get && slice[1].get.parameters) || [];
    opacityParam = params.some((q) => q.name === "opacity");
    $("overlay-opacity").parentElement.hidden = !opacityParam;
  } catch (err) { /* no OpenAPI document: try the endpoints as they come */ }
}

async function main() {
  wire();
  await features();
  try {
    state.collections = (await getJSON(`${API}/collections`)).items;
    fillSelect($("collection-select"), state.collections.map((c) => c.name),
      state.collections.map((c) => `${c.name} (${c.case_count} cases)`));
    route();
  } catch (err) { status(err.message, true); }
}

main();
