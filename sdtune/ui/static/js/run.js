// run.js: the run page. Polls GET /api/runs/<run> (every second while the run is queued, running or
// stopping; slower after) and shows its state, step, ETA, loss chart, samples (a slider over the
// steps, following the newest), figures, LoRA link, commands and log tail; Stop and Resume post to
// the run's latest job; the generate panel posts /api/generate and polls that job for its images.
import { $, api, badge, el, errorText, fmtDuration, fmtNumber, header, poll, withToken } from "./api.js";
import { drawLossChart } from "./chart.js";

header("");

const ACTIVE = new Set(["queued", "running", "stopping"]);
const run = decodeURIComponent(location.pathname.replace(/^\/run\//, "").replace(/\/$/, ""));
const apiPath = `/api/runs/${encodeURIComponent(run)}`;
let info = null;
let samples = [];
let followLatest = true;
let shownFigures = "";
let version = "";  // changes when the run's files may have been rewritten (images are fetched again)

$("#run-path").textContent = run;
document.title = `sdtune · ${run}`;

/** A file URL with the token and a version tag, so a rewritten image (samples.png after a resume) reloads. */
function fileUrl(url) {
  if (!url) return url;
  const u = new URL(withToken(url), location.origin);
  if (version) u.searchParams.set("v", version);
  return u.pathname + u.search;
}

function isActive() {
  const job = info && info.job;
  return !!info && (ACTIVE.has(info.state) || (job && ACTIVE.has(job.state)));
}

function renderState() {
  const job = info.job;
  const state = info.state || (job && job.state) || "unknown";
  const stateNode = $("#state");
  stateNode.className = `badge ${state}`;
  stateNode.textContent = state;
  $("#run-name").textContent = info.name || run;
  $("#step").textContent = info.max_steps ? `${info.step ?? 0} / ${info.max_steps}` : fmtNumber(info.step);
  $("#eta").textContent = isActive() && info.eta_seconds !== null && info.eta_seconds !== undefined
    ? fmtDuration(info.eta_seconds) : (state === "finished" ? "done" : "–");
  $("#elapsed").textContent = fmtDuration(info.elapsed_seconds);
  const train = (info.loss && info.loss.train) || [];
  $("#final-loss").textContent = train.length ? fmtNumber(train[train.length - 1][1]) : "–";

  const stop = $("#stop");
  const canStop = job && (job.state === "running" || job.state === "queued");
  stop.classList.toggle("hidden", !canStop);
  stop.textContent = job && job.state === "queued" ? "Cancel" : "Stop";
  stop.disabled = false;
  const resume = $("#resume");
  resume.classList.toggle("hidden", !(job && job.resumable && !isActive()));
  resume.disabled = false;
  const lora = $("#lora-download");
  lora.classList.toggle("hidden", !info.lora_url);
  if (info.lora_url) lora.href = withToken(info.lora_url);
}

function showSample() {
  const slider = $("#samples-slider");
  const sample = samples[Number(slider.value)];
  const img = $("#sample-image");
  if (!sample) { img.classList.add("hidden"); $("#sample-step").textContent = "no samples yet"; return; }
  const src = fileUrl(sample.url);
  if (img.getAttribute("src") !== src) img.src = src;
  img.classList.remove("hidden");
  const last = Number(slider.value) === samples.length - 1 && !isActive() && info.summary;
  $("#sample-step").textContent = `step ${sample.step}${last ? " (final)" : ""} · ${Number(slider.value) + 1} of ${samples.length}`;
}

function renderSamples() {
  samples = info.samples || [];
  const slider = $("#samples-slider");
  slider.max = String(Math.max(0, samples.length - 1));
  slider.disabled = samples.length < 2;
  if (followLatest || Number(slider.value) > samples.length - 1) slider.value = String(Math.max(0, samples.length - 1));
  showSample();
}

/** summary.json's concept probe in words: per trigger, the share of samples showing the concept, LoRA off and on. */
function probeText(probe) {
  if (!probe || typeof probe !== "object") return "";
  const pct = (x) => (typeof x === "number" ? `${Math.round(x * 100)}%` : "–");
  const parts = Object.entries(probe).map(([trigger, p]) => {
    if (!p || typeof p !== "object" || !p.concept) return `${trigger}: ${JSON.stringify(p)}`;
    const off = p.lora_off && p.lora_off[p.concept], on = p.lora_on && p.lora_on[p.concept];
    return `'${trigger}' prompts read as ${p.concept}: ${pct(off)} with the LoRA off, ${pct(on)} on` +
      (p.samples ? ` (${p.samples} samples)` : "");
  });
  return parts.length ? `Concept probe: ${parts.join("; ")}.` : "";
}

function renderFigures() {
  const figures = info.figures || [];
  const key = version + JSON.stringify(figures);
  if (key === shownFigures) return;
  shownFigures = key;
  $("#figures").replaceChildren(...(figures.length ? figures.map((f) => el("figure", {},
    el("a", { href: fileUrl(f.url), target: "_blank" }, el("img", { src: fileUrl(f.url), alt: f.name, dataset: { name: f.name } })),
    el("figcaption", { text: f.name }))) : [el("p", { class: "empty", text: "No figures yet: they are written when the run ends." })]));
  $("#probe").textContent = probeText(info.probe);
}

function renderText() {
  $("#command").textContent = info.command || "";
  $("#resume-box").classList.toggle("hidden", !info.resume_command);
  $("#resume-command").textContent = info.resume_command || "";
  const log = $("#log-tail");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
  const tail = Array.isArray(info.log_tail) ? info.log_tail.join("\n") : (info.log_tail || "");
  if (log.textContent !== tail) {
    log.textContent = tail;
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
}

async function load() {
  const res = await api(apiPath);
  if (!res.ok) { $("#run-error").textContent = errorText(res); return; }
  $("#run-error").textContent = "";
  info = res.data;
  const job = info.job;
  version = [info.state, job ? job.id : "", info.summary ? "s" : ""].join("-");
  renderState();
  drawLossChart($("#loss-chart"), info.loss, info.max_steps);
  renderSamples();
  renderFigures();
  renderText();
}

async function jobAction(action, button) {
  if (!info || !info.job) return;
  button.disabled = true;
  const res = await api(`/api/jobs/${encodeURIComponent(info.job.id)}/${action}`, { method: "POST" });
  $("#run-error").textContent = res.ok ? "" : errorText(res);
  await load();
}

$("#stop").addEventListener("click", (e) => jobAction("stop", e.target));
$("#resume").addEventListener("click", (e) => { followLatest = true; jobAction("resume", e.target); });
$("#samples-slider").addEventListener("input", () => {
  followLatest = Number($("#samples-slider").value) === samples.length - 1;
  showSample();
});

async function watchGenerate(id) {
  for (;;) {
    const res = await api(`/api/jobs/${encodeURIComponent(id)}`);
    if (!res.ok) { $("#gen-error").textContent = errorText(res); break; }
    const job = res.data.job || res.data;
    $("#gen-state").replaceChildren(badge(job.state));
    if (!ACTIVE.has(job.state)) {
      const images = job.images || [];
      $("#gen-images").replaceChildren(...images.map((url) => el("img", {
        src: withToken(url), alt: "generated image", class: /grid\.png(\?|$)/.test(url) ? "grid" : "single" })));
      if (job.state !== "finished") $("#gen-error").textContent = `generation ${job.state}` +
        (job.exit_code !== null && job.exit_code !== undefined ? ` (exit ${job.exit_code})` : "") +
        (job.log_tail ? `:\n${[].concat(job.log_tail).join("\n").slice(-1500)}` : "");
      break;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
  $("#gen-submit").disabled = false;
}

$("#gen-submit").addEventListener("click", async () => {
  $("#gen-error").textContent = "";
  $("#gen-submit").disabled = true;
  $("#gen-images").replaceChildren();
  const seed = Number($("#gen-seed").value || 0), weight = Number($("#gen-weight").value || 1);
  const res = await api("/api/generate", { method: "POST", body: {
    run, prompt: $("#gen-prompt").value || $("#gen-prompt").placeholder, seed, weight, compare: $("#gen-compare").checked } });
  if (!res.ok) { $("#gen-error").textContent = errorText(res); $("#gen-submit").disabled = false; return; }
  $("#gen-state").replaceChildren(badge(res.data.job.state));
  watchGenerate(res.data.job.id);
});

poll(load, () => (isActive() ? 1000 : 4000));
