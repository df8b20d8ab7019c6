"""The study page's fixed parts: its style, its script (charts, drill-down), its template, the
inlined Vega bundle, and the JSON embedding of its data (what a browser parses: no NaN, no
``</`` that would close the script element)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np


def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script (the version altair writes specs for)."""
    from altair.utils._importers import import_vl_convert, vl_version_for_vl_convert

    bundle = import_vl_convert().javascript_bundle(vl_version=vl_version_for_vl_convert())
    return bundle.replace("</script", "<\\/script")


def script_json(payload: Any) -> str:
    """``payload`` as JSON a browser parses: NaN and infinities (which charts may carry for
    cells without data) become null, and no ``</`` can close the script element."""
    text = json.dumps(finite(payload), ensure_ascii=False, allow_nan=False, default=json_default)
    return text.replace("</", "<\\/")


def finite(node: Any) -> Any:
    if isinstance(node, float):
        return node if math.isfinite(node) else None
    if isinstance(node, dict):
        return {key: finite(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [finite(value) for value in node]
    return node


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, (datetime, Path)):
        return str(obj)
    raise TypeError(f"cannot embed {type(obj).__name__}")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 12px 24px; background: #f4f4f4; border-bottom: 1px solid #ddd; }
header h1 { font-size: 20px; margin: 0 0 4px 0; }
header p { margin: 0; color: #555; font-size: 13px; }
nav { margin-top: 8px; font-size: 13px; }
nav a { margin-right: 14px; }
.layout { display: flex; align-items: flex-start; }
main { flex: 1; min-width: 0; padding: 0 24px 40px 24px; }
aside { position: sticky; top: 0; width: 520px; max-height: 100vh; overflow: auto;
        border-left: 1px solid #ddd; padding: 12px 16px; box-sizing: border-box;
        background: #fcfcfc; font-size: 13px; }
section { border-bottom: 1px solid #eee; padding-bottom: 16px; }
h2 { font-size: 18px; margin-top: 24px; }
h3 { font-size: 15px; }
.chart { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
pre, code, .program { font-family: ui-monospace, monospace; font-size: 12px; }
.program { white-space: pre-wrap; }
.hint, .note { color: #666; font-size: 12px; }
.path { display: block; color: #444; font-family: ui-monospace, monospace; font-size: 12px; }
#drill-empty { color: #888; }
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('study-data').textContent);
const fmt = (x) => (x === null || x === undefined || !isFinite(x)) ? '–' : x.toFixed(3);
const esc = (s) => String(s ?? '').replace(/[&<>"]/g,
  (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));

function stats(values) {
  const n = values.length;
  const mean = values.reduce((a, b) => a + b, 0) / n;
  const pop = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / n);
  const half = n > 1 ? 1.959963984540054 * pop / Math.sqrt(n - 1) : NaN;
  return {n, mean, std: pop, low: mean - half, high: mean + half};
}

function drill(version, datum) {
  const panel = document.getElementById('drill');
  if (!datum || datum.layer === undefined || datum.site === undefined) return;
  const k = datum.divergence_index;
  const group = (DATA.drill[version] || {})[`${datum.site}|${k}`];
  // a slice grid's cells are token roles: its pairs' values are keyed by role, not position
  const byRole = Boolean(group && group.by_role);
  const position = byRole ? datum.label : datum.position;
  const key = `${datum.layer}|${datum.head ?? ''}|${position ?? ''}`;
  const cell = group ? group.cells[key] : undefined;
  const where = [`${datum.site}`, `k = ${k}`, `layer ${datum.layer}`]
    .concat(datum.head !== undefined && datum.head !== null ? [`head ${datum.head}`] : [])
    .concat(byRole ? [`role ${position}`] : [])
    .concat(!byRole && datum.position !== undefined && datum.position !== null
      ? [`position ${datum.position} '${group ? group.cells[key + '#label'] ?? '' : ''}'`] : []);
  if (!cell) {
    panel.innerHTML = `<h3>${esc(where.join(' · '))}</h3><p>No pair has a value here.</p>`;
    panel.dataset.cell = key;
    return;
  }
  const entries = [];
  cell.forEach((v, i) => { if (v !== null) entries.push({pair: group.pairs[i], value: v}); });
  const s = stats(entries.map((e) => e.value));
  const sign = s.mean >= 0 ? -1 : 1;
  const drivers = entries.slice().sort((a, b) => sign * (a.value - b.value)).slice(0, DATA.n_drivers);
  const rows = drivers.map((e) => {
    const p = DATA.pairs[e.pair];
    const oneLine = (text) => esc(String(text ?? '').trim().split('\n').join('; '));
    return `<tr><td>${esc(p[0])}</td><td>${fmt(e.value)}</td>` +
      `<td>${esc(p[4])}</td><td>${esc(p[5])}</td>` +
      `<td class="program">${esc(p[6])} / ${esc(p[7])}</td>` +
      `<td class="program">${oneLine(p[2])}</td><td class="program">${oneLine(p[3])}</td></tr>`;
  }).join('');
  panel.innerHTML = `<h3>${esc(where.join(' · '))}</h3>` +
    `<p>patching ${esc(version)} · ${esc(DATA.metric)}: mean <b>${fmt(s.mean)}</b>, ` +
    `std ${fmt(s.std)}, n ${s.n}, 95% CI [${fmt(s.low)}, ${fmt(s.high)}]</p>` +
    `<div id="drill-hist"></div>` +
    `<h4>The ${drivers.length} pairs that drive the mean most</h4>` +
    `<table id="drill-pairs"><thead><tr><th>pair</th><th>value</th><th>answer A</th>` +
    `<th>answer B</th><th>changed statement A / B</th><th>program A</th><th>program B</th>` +
    `</tr></thead><tbody>${rows}</tbody></table>`;
  panel.dataset.cell = key;
  vegaEmbed('#drill-hist', {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    data: {values: entries.map((e) => ({value: e.value}))},
    mark: {type: 'bar', color: '#4c78a8'},
    width: 340, height: 120,
    title: 'distribution over pairs',
    encoding: {
      x: {field: 'value', bin: {maxbins: 20}, title: DATA.metric},
      y: {aggregate: 'count', title: 'pairs'},
    },
  }, {actions: false, renderer: 'svg'}).catch((err) => console.error(err));
}

async function main() {
  let done = 0;
  for (const entry of DATA.charts) {
    const result = await vegaEmbed('#' + entry.id, entry.spec, {actions: false, renderer: 'svg'});
    if (entry.drill) {
      result.view.addEventListener('click', (event, item) => drill(entry.drill, item && item.datum));
    }
    done += 1;
  }
  document.body.dataset.chartsRendered = String(done);
}
main().catch((err) => console.error(err));
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{style}</style>
<script>{vega}</script>
</head>
<body>
<header><h1>{title}</h1><p>{subtitle}</p><nav>{nav}</nav></header>
<div class="layout">
<main>
{sections}
</main>
<aside><h2>Drill-down</h2><div id="drill"><p id="drill-empty">Click a cell of a patching chart
to see the distribution of its values over pairs and the pairs that drive its mean.</p></div>
</aside>
</div>
<script type="application/json" id="study-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""
