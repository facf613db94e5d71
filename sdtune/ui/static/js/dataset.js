// dataset.js: the dataset view. POST /api/dataset {root, model, resolution} opens a folder and lists the images
// with caption, size, bucket and verdict (the run's own pre-flight checks); each card's Save button
// sends PUT /api/dataset/caption (the server writes that one caption file atomically, never an image).
import { $, api, badge, el, errorText, header, withToken } from "./api.js";

header("/dataset");

let root = "";

function card(image) {
  const caption = el("textarea", { class: "caption", rows: 3, spellcheck: "false" });
  caption.value = image.caption ?? "";
  const status = el("span", { class: "status" });
  const save = el("button", { class: "save", type: "button", text: "Save caption" });
  caption.addEventListener("input", () => { status.textContent = "edited: press Save to write it"; status.className = "status bad"; });
  save.addEventListener("click", async () => {
    save.disabled = true;
    const res = await api("/api/dataset/caption", { method: "PUT", body: { root, file: image.file, caption: caption.value } });
    save.disabled = false;
    status.className = res.ok ? "status saved" : "status bad";
    status.textContent = res.ok ? `saved to ${res.data.caption_file || image.caption_file || "its caption file"}` : errorText(res);
  });
  const size = image.width ? `${image.width}×${image.height}` : "";
  const bucket = image.bucket ? ` → bucket ${image.bucket[0]}×${image.bucket[1]}` : "";
  return el("div", { class: "card dcard", dataset: { file: image.file } },
    el("img", { src: withToken(image.url), alt: image.file, loading: "lazy" }),
    el("div", { class: "row", style: "justify-content:space-between" },
      el("span", { class: "file", text: image.file }), el("span", { class: "verdict" }, badge(image.verdict))),
    el("div", { class: "reason", text: image.reason || `${size}${bucket}` }),
    el("div", { class: "small muted", text: image.reason ? `${size}${bucket}` : (image.caption_file ? `caption: ${image.caption_file}` : "no caption file") }),
    caption,
    el("div", { class: "row" }, save, status));
}

async function open() {
  const wanted = $("#dataset-root").value.trim();
  $("#dataset-error").textContent = "";
  if (!wanted) { $("#dataset-error").textContent = "Type the dataset folder's absolute path first."; return; }
  const q = { root: wanted };
  if ($("#dataset-model").value) q.model = $("#dataset-model").value;
  if ($("#dataset-resolution").value) q.resolution = $("#dataset-resolution").value;
  $("#dataset-open").disabled = true;
  const res = await api("/api/dataset", { method: "POST", body: q });
  $("#dataset-open").disabled = false;
  const url = new URL(location.href);
  url.searchParams.set("root", wanted);
  history.replaceState(null, "", url);
  if (!res.ok) {
    $("#dataset-error").textContent = errorText(res);
    $("#dataset-grid").replaceChildren();
    $("#dataset-empty").classList.remove("hidden");
    $("#dataset-summary").textContent = "";
    return;
  }
  root = res.data.root || wanted;
  const images = res.data.images || [];
  const skipped = images.filter((i) => i.verdict !== "ok").length;
  $("#dataset-summary").textContent = `${root} · ${images.length} image${images.length === 1 ? "" : "s"}` +
    (skipped ? ` · ${skipped} would be skipped` : "");
  $("#dataset-grid").replaceChildren(...images.map(card));
  $("#dataset-empty").classList.toggle("hidden", images.length > 0);
  if (!images.length) $("#dataset-empty").textContent = "No images in this folder.";
}

async function init() {
  $("#dataset-form").addEventListener("submit", (e) => { e.preventDefault(); open(); });
  const params = new URLSearchParams(location.search);
  const res = await api("/api/presets");
  const models = res.ok ? res.data.models || [] : [];
  $("#dataset-model").replaceChildren(el("option", { value: "", text: "(default)" }),
    ...models.map((m) => el("option", { value: m, text: m })));
  if (params.get("model")) $("#dataset-model").value = params.get("model");
  if (params.get("resolution")) $("#dataset-resolution").value = params.get("resolution");
  if (params.get("root")) { $("#dataset-root").value = params.get("root"); open(); }
}

init();
