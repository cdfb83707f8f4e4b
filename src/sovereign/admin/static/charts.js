// Small dependency-free SVG charts for the dashboard.
import { h, s } from "./dom.js";

function path(points, w, hgt, max) {
  const step = points.length > 1 ? w / (points.length - 1) : w;
  return points.map((v, i) => `${i ? "L" : "M"}${(i * step).toFixed(1)},${(hgt - (v / max) * (hgt - 8) - 2).toFixed(1)}`).join("");
}

export function lineChart(title, unit, points) {
  const w = 600, hgt = 140;
  const values = points.map((p) => p.value);
  const max = Math.max(1, ...values);
  const line = path(values, w, hgt, max);
  const svg = s(
    "svg",
    { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", role: "img", "aria-label": `${title}, last hour` },
    s("path", { class: "area", d: `${line}L${w},${hgt}L0,${hgt}Z` }),
    s("path", { class: "line", d: line, "vector-effect": "non-scaling-stroke" }),
  );
  const peak = values.some(Boolean) ? max : 0;
  return chartCard(title, `${values.at(-1) ?? 0} now · peak ${peak}`, svg, peak ? "" : `No ${unit} in the last hour yet.`);
}

export function barChart(title, unit, points) {
  const w = 600, hgt = 140;
  const values = points.map((p) => p.value);
  const max = Math.max(1, ...values);
  const bw = w / values.length;
  const svg = s(
    "svg",
    { viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none", role: "img", "aria-label": `${title}, last hour` },
    ...values.map((v, i) => {
      const bh = v ? Math.max(2, (v / max) * (hgt - 6)) : 0;
      return s("rect", { class: "bar", x: (i * bw + 1).toFixed(1), y: (hgt - bh).toFixed(1), width: Math.max(1, bw - 2).toFixed(1), height: bh.toFixed(1), rx: 1.5 });
    }),
  );
  const total = values.reduce((a, b) => a + b, 0);
  return chartCard(title, `${total} in the last hour`, svg, total ? "" : `No ${unit} in the last hour yet.`);
}

function chartCard(title, summary, svg, emptyText) {
  return h(
    "div",
    { class: "card chart" },
    h("div", { class: "chart-head" }, h("h2", {}, title), h("span", { class: "muted small" }, summary)),
    h("div", { class: "plot" }, svg, emptyText ? h("p", { class: "plot-empty muted small" }, emptyText) : null),
    h("div", { class: "axis" }, h("span", {}, "60 min ago"), h("span", {}, "now")),
  );
}
