// new.js: the new-run form. Builds the fields from GET /api/presets, asks POST /api/check (debounced)
// as the user types for the equivalent command and the CLI's messages (shown beside the field they
// name), and POST /api/jobs on Start, then opens the run's page. Only edited fields are sent, so an
// untouched field keeps the chosen preset's value.
import { $, api, debounce, el, errorText, header, runHref } from "./api.js";

header("/new");

let fields = [];
const edited = new Set();
let checkSeq = 0;

function input(field) {
  const common = { id: `field-${field.key}`, dataset: { key: field.key, type: field.type }, name: field.key };
  if (field.type === "bool") return el("input", { ...common, type: "checkbox", checked: !!field.default });
  // untouched: empty, the preset's value shown as the placeholder (it is what the run gets)
  const attrs = { ...common, type: field.type === "str" ? "text" : "number",
    placeholder: field.default === null || field.default === undefined ? "not set" : String(field.default) };
  if (field.type === "float") attrs.step = "any";
  if (field.type === "int") attrs.step = "1";
  return el("input", attrs);
}

/** The chosen preset's values as placeholders of the untouched fields (GET /api/presets?experiment=&model=). */
async function refreshDefaults() {
  const q = new URLSearchParams({ experiment: $("#experiment").value, model: $("#model").value });
  const res = await api(`/api/presets?${q}`);
  if (!res.ok) return;
  for (const field of res.data.fields || []) {
    const node = document.querySelector(`[data-key="${CSS.escape(field.key)}"]`);
    if (!node || edited.has(field.key)) continue;
    if (field.type === "bool") node.checked = !!field.default;
    else node.placeholder = field.default === null || field.default === undefined ? "not set" : String(field.default);
  }
}

function renderFields() {
  $("#fields").replaceChildren(...fields.map((field) => {
    const control = input(field);
    const label = field.type === "bool"
      ? el("label", { class: "check" }, control, field.label || field.key)
      : el("label", { for: control.id, text: field.label || field.key });
    return el("div", { class: "field" }, label, field.type === "bool" ? null : control,
      el("span", { class: "help", text: `${field.key}${field.help ? " · " + field.help : ""}` }),
      el("span", { class: "error", dataset: { errorFor: field.key } }));
  }));
}

function value(node) {
  const type = node.dataset.type;
  if (type === "bool") return node.checked;
  const raw = node.value.trim();
  if (type === "int" || type === "float") {
    if (raw === "") return null;
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw;  // the server names what is wrong with it
  }
  return raw;
}

function body() {
  const values = {};
  for (const node of document.querySelectorAll("[data-key]")) {
    if (edited.has(node.dataset.key)) values[node.dataset.key] = value(node);
  }
  return { experiment: $("#experiment").value || null, model: $("#model").value || null,
    fields: values, overrides: $("#overrides").value };
}

/** Show each message beside the field it names (else beside the overrides); clear the others. */
function showErrors(errors) {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  for (const err of errors || []) {
    let slot = document.querySelector(`[data-error-for="${CSS.escape(err.field)}"]`);
    const text = slot ? err.message : `${err.field}: ${err.message}`;
    slot = slot || document.querySelector('[data-error-for="overrides"]');
    slot.textContent = slot.textContent ? `${slot.textContent}\n${text}` : text;
    const control = err.field === "overrides" ? $("#overrides")
      : document.querySelector(`[data-key="${CSS.escape(err.field)}"]`) || document.getElementById(err.field);
    if (control) control.classList.add("invalid");
  }
}

async function check() {
  const seq = ++checkSeq;
  $("#check-state").textContent = "checking…";
  const res = await api("/api/check", { method: "POST", body: body() });
  if (seq !== checkSeq) return;  // a newer check is under way
  if (!res.ok) {
    $("#check-state").textContent = "";
    showErrors([{ field: "overrides", message: errorText(res) }]);
    return;
  }
  $("#command").textContent = res.data.command || "";
  showErrors(res.data.errors);
  const n = (res.data.errors || []).length;
  $("#check-state").textContent = res.data.ok ? "checked: ready to start" : `${n} problem${n === 1 ? "" : "s"}`;
  $("#check-state").dataset.ok = String(!!res.data.ok);
}

const checkSoon = debounce(check, 350);

function onEdit(event) {
  const key = event.target.dataset && event.target.dataset.key;
  if (key) {
    if (event.target.value === "" && event.target.type !== "checkbox") edited.delete(key);  // emptied: the preset's again
    else edited.add(key);
  }
  if (event.type === "change" && (event.target.id === "experiment" || event.target.id === "model")) refreshDefaults();
  checkSoon();
}

async function submit() {
  const button = $("#submit");
  button.disabled = true;
  $("#submit-error").textContent = "";
  ++checkSeq;  // a check still under way must not overwrite what the submit answers
  const res = await api("/api/jobs", { method: "POST", body: body() });
  button.disabled = false;
  if (res.ok && res.data.job) {
    location.href = res.data.job.run ? runHref(res.data.job.run) : "/";
    return;
  }
  if (res.data && res.data.errors) {
    showErrors(res.data.errors);
    if (res.data.command) $("#command").textContent = res.data.command;
    $("#submit-error").textContent = "Not started: fix the fields marked above.";
  } else {
    $("#submit-error").textContent = errorText(res);
  }
}

async function init() {
  const res = await api("/api/presets");
  if (!res.ok) { $("#submit-error").textContent = errorText(res); return; }
  const presets = res.data;
  fields = presets.fields || [];
  const params = new URLSearchParams(location.search);
  const wanted = params.get("experiment") || (presets.experiments.includes("quickstart") ? "quickstart" : "");
  $("#experiment").replaceChildren(el("option", { value: "", text: "(none: conf/config.yaml)" }),
    ...presets.experiments.map((name) => el("option", { value: name, text: name, selected: name === wanted })));
  $("#model").replaceChildren(el("option", { value: "", text: "(the preset's model)" }),
    ...presets.models.map((name) => el("option", { value: name, text: name, selected: name === params.get("model") })));
  renderFields();
  const form = $("#new-form");
  form.addEventListener("input", onEdit);
  form.addEventListener("change", onEdit);
  form.addEventListener("submit", (e) => e.preventDefault());
  $("#submit").addEventListener("click", submit);
  refreshDefaults();
  check();
}

init();
