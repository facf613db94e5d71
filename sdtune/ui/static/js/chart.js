// chart.js: the run page's loss chart, drawn as plain SVG: the train loss as a line, the validation
// loss as a line with dots, axes with "nice" ticks (steps below, loss at the left), a grid and a
// legend. The <svg> gets data-points = the number of train points drawn (tests read it).

const NS = "http://www.w3.org/2000/svg";
const W = 720, H = 280, M = { top: 14, right: 18, bottom: 36, left: 56 };

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** About `count` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart). */
export function niceTicks(lo, hi, count = 5) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (hi === lo) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => raw <= s) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function tickLabel(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

/** Draw {train: [[step, loss]...], val: [[step, loss]...]} into `svg`, replacing what it held. */
export function drawLossChart(svg, loss, maxSteps) {
  const train = (loss && loss.train) || [];
  const val = (loss && loss.val) || [];
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("data-points", String(train.length));
  svg.setAttribute("data-val-points", String(val.length));
  svg.replaceChildren();
  const all = train.concat(val);
  const pw = W - M.left - M.right, ph = H - M.top - M.bottom;
  if (!all.length) {
    svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no loss logged yet"));
    return;
  }
  const steps = all.map((p) => p[0]), values = all.map((p) => p[1]).filter((v) => isFinite(v));
  const x0 = 0, x1 = Math.max(maxSteps || 0, ...steps, 1);
  let y0 = Math.min(...values), y1 = Math.max(...values);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 0.1;
  y0 -= pad; y1 += pad;
  const yTicks = niceTicks(y0, y1, 5);
  y0 = Math.min(y0, yTicks[0]); y1 = Math.max(y1, yTicks[yTicks.length - 1]);
  const sx = (s) => M.left + ((s - x0) / (x1 - x0)) * pw;
  const sy = (v) => M.top + (1 - (v - y0) / (y1 - y0)) * ph;

  const grid = svgEl("g", { class: "grid" }), axis = svgEl("g", { class: "axis" });
  for (const t of yTicks) {
    grid.append(svgEl("line", { x1: M.left, x2: M.left + pw, y1: sy(t), y2: sy(t) }));
    axis.append(svgEl("text", { x: M.left - 8, y: sy(t) + 4, "text-anchor": "end" }, tickLabel(t)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    grid.append(svgEl("line", { x1: sx(t), x2: sx(t), y1: M.top, y2: M.top + ph }));
    axis.append(svgEl("text", { x: sx(t), y: M.top + ph + 16, "text-anchor": "middle", class: "step-label" }, String(t)));
  }
  axis.append(svgEl("line", { x1: M.left, x2: M.left + pw, y1: M.top + ph, y2: M.top + ph }));
  axis.append(svgEl("line", { x1: M.left, x2: M.left, y1: M.top, y2: M.top + ph }));
  axis.append(svgEl("text", { x: M.left + pw / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  axis.append(svgEl("text", { x: 12, y: M.top + ph / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${M.top + ph / 2})` }, "loss"));
  svg.append(grid, axis);

  const path = (points) => points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  if (train.length) svg.append(svgEl("path", { class: "train", d: path(train) }));
  if (val.length) {
    svg.append(svgEl("path", { class: "val", d: path(val) }));
    for (const p of val) svg.append(svgEl("circle", { class: "val-dot", cx: sx(p[0]), cy: sy(p[1]), r: 3 }));
  }
  if (train.length === 1) {
    svg.append(svgEl("circle", { cx: sx(train[0][0]), cy: sy(train[0][1]), r: 3, fill: "currentColor", class: "train-dot" }));
  }
}
