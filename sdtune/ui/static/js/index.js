// index.js: the runs page. Loads GET /api/runs into a table sortable by any column (numbers by value,
// missing values last), GET /api/jobs into the queue panel (polled; stop, cancel and resume buttons),
// and POST /api/compare for the ticked runs (the report's loss overlay and sample grid).
import { $, api, badge, el, errorText, fmtBytes, fmtNumber, fmtTime, header, poll, runHref, withToken } from "./api.js";

header("/");
$("#new-run").href = withToken("/new");

const BASE_COLUMNS = [
  ["name", "run"], ["state", "state"], ["step", "step"], ["final_train_loss", "train loss"],
  ["min_train_loss", "min train loss"], ["final_val_loss", "val loss"], ["steps_per_second", "steps/s"],
  ["wall_seconds", "wall s"], ["lora_bytes", "LoRA"], ["created", "created"],
];
let runs = [];
let sort = { key: "created", dir: -1 };
const chosen = new Set();
let lastJobsKey = null;

function columns() {
  const extra = new Set();
  for (const r of runs) for (const k of Object.keys(r)) if (k.startsWith("eval/")) extra.add(k);
  return BASE_COLUMNS.concat([...extra].sort().map((k) => [k, k]));
}

function compareValues(a, b) {
  const missing = (v) => v === null || v === undefined || v === "";
  if (missing(a) && missing(b)) return 0;
  if (missing(a)) return 1;
  if (missing(b)) return -1;
  if (typeof a === "number" && typeof b === "number") return (a - b) * sort.dir;
  return String(a).localeCompare(String(b), undefined, { numeric: true }) * sort.dir;
}

function cell(key, run) {
  const v = run[key];
  if (key === "name") return el("td", {}, el("a", { href: runHref(run.run), text: run.name || run.run }));
  if (key === "state") return el("td", {}, badge(v));
  if (key === "step") return el("td", { class: "num", text: run.max_steps ? `${v ?? "–"} / ${run.max_steps}` : fmtNumber(v) });
  if (key === "lora_bytes") return el("td", { class: "num", text: fmtBytes(v) });
  if (key === "created") return el("td", { text: fmtTime(v) });
  return el("td", { class: "num", text: fmtNumber(v) });
}

function renderRuns() {
  const cols = columns();
  const head = $("#runs-table thead tr");
  head.replaceChildren(el("th", { text: "" }), ...cols.map(([key, label]) => el("th", {
    dataset: { sort: key }, text: label,
    class: sort.key === key ? (sort.dir > 0 ? "sorted-asc" : "sorted-desc") : null,
    onclick: () => { sort = { key, dir: sort.key === key ? -sort.dir : (key === "name" ? 1 : -1) }; renderRuns(); },
  })));
  const rows = [...runs].sort((a, b) => compareValues(a[sort.key], b[sort.key]));
  $("#runs-table tbody").replaceChildren(...rows.map((run) => el("tr", { dataset: { run: run.run } },
    el("td", {}, el("input", {
      type: "checkbox", class: "compare", title: "compare this run", checked: chosen.has(run.run),
      onchange: (e) => { e.target.checked ? chosen.add(run.run) : chosen.delete(run.run); updateCompareButton(); },
    })),
    ...cols.map(([key]) => cell(key, run)))));
  $("#runs-empty").textContent = "No runs yet under the outputs folder. Start one from New run.";
  $("#runs-empty").classList.toggle("hidden", runs.length > 0);
  $("#runs-count").textContent = `${runs.length} run${runs.length === 1 ? "" : "s"}`;
}

function updateCompareButton() {
  for (const r of [...chosen]) if (!runs.some((x) => x.run === r)) chosen.delete(r);
  $("#compare-button").disabled = chosen.size < 2;
  $("#compare-hint").textContent = chosen.size < 2 ? "Tick two or more runs in the table, then" : `${chosen.size} runs chosen`;
}

async function loadRuns() {
  const res = await api("/api/runs");
  $("#runs-error").textContent = res.ok ? "" : errorText(res);
  if (!res.ok) return;
  runs = res.data.runs || [];
  renderRuns();
  updateCompareButton();
}

async function jobAction(job, action) {
  const res = await api(`/api/jobs/${encodeURIComponent(job.id)}/${action}`, { method: "POST" });
  $("#queue-error").textContent = res.ok ? "" : errorText(res);
  await loadJobs();
}

function renderJob(job, latest) {
  const actions = el("div", { class: "row" });
  if (job.state === "running") actions.append(el("button", { class: "danger stop", text: "Stop", onclick: () => jobAction(job, "stop") }));
  if (job.state === "queued") actions.append(el("button", { class: "cancel", text: "Cancel", onclick: () => jobAction(job, "stop") }));
  if (job.resumable && latest) actions.append(el("button", { class: "resume", text: "Resume", onclick: () => jobAction(job, "resume") }));
  return el("li", { dataset: { job: job.id, state: job.state } },
    el("div", {}, badge(job.state), " ", el("strong", { text: job.kind }), " ",
      job.run ? el("a", { href: runHref(job.run), text: job.run }) : null),
    actions,
    el("div", { class: "meta", text: `#${job.id} · ${job.device || "cpu"} · ${fmtTime(job.created)}` +
      (job.exit_code !== null && job.exit_code !== undefined ? ` · exit ${job.exit_code}` : "") }));
}

async function loadJobs() {
  const res = await api("/api/jobs");
  $("#queue-error").textContent = res.ok ? "" : errorText(res);
  if (!res.ok) return;
  const jobs = res.data.jobs || [];
  const newest = new Map();  // run -> its latest job (jobs come newest first): only that one offers Resume
  for (const job of jobs) if (job.run && !newest.has(job.run)) newest.set(job.run, job.id);
  $("#queue").replaceChildren(...jobs.map((job) => renderJob(job, !job.run || newest.get(job.run) === job.id)));
  $("#queue-empty").classList.toggle("hidden", jobs.length > 0);
  const key = jobs.map((j) => `${j.id}:${j.state}`).join(",");
  if (key !== lastJobsKey) { lastJobsKey = key; loadRuns(); }  // a job changed: its run's row did too
}

$("#compare-button").addEventListener("click", async () => {
  const button = $("#compare-button");
  button.disabled = true;
  button.textContent = "Comparing…";
  const res = await api("/api/compare", { method: "POST", body: { runs: [...chosen] } });
  button.textContent = "Compare";
  updateCompareButton();
  $("#compare-error").textContent = res.ok ? "" : errorText(res);
  if (!res.ok) return;
  $("#compare-result").classList.remove("hidden");
  for (const [id, url] of [["#compare-loss", res.data.loss_curves], ["#compare-samples", res.data.samples_grid]]) {
    const img = $(id);
    img.classList.toggle("hidden", !url);
    if (url) img.src = withToken(url);
  }
  const table = res.data.table || [];
  const keys = table.length ? Object.keys(table[0]) : [];
  $("#compare-table").replaceChildren(
    el("thead", {}, el("tr", {}, keys.map((k) => el("th", { text: k })))),
    el("tbody", {}, table.map((row) => el("tr", {}, keys.map((k) => el("td", { text: fmtNumber(row[k]) }))))));
});

poll(loadJobs, () => (document.hidden ? 10000 : 2000));
setInterval(() => { if (!document.hidden) loadRuns(); }, 8000);  // runs started from a shell too
