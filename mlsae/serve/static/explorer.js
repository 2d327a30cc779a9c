// mlsae explorer: three views of one page over the JSON API (/api/...), drawn as DOM + SVG.
// No framework, no build step, nothing from the network but this server. All text from
// the server is set with textContent (never parsed as HTML).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const DEFAULT_PROMPT = "When John and Mary went to the store, John gave a drink to";
const ACT_THRESHOLD = 1e-3;

// ----------------------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function sv(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c) node.append(c);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

function visible(text) {  // show whitespace-only / control tokens readably
  return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}

function url(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

function params() { return new URLSearchParams(location.search); }

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.detail) || `${response.status} ${response.statusText}`);
  return data;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function panel(title, id, ...children) {
  return el("section", {class: "panel", id}, el("h2", {text: title}), ...children);
}

function sqlBlock(sql, note) {
  return el("details", {class: "sql"},
    el("summary", {text: note || "SQL (runs as is with: mlsae sql \"…\")"}),
    el("pre", {class: "sql", text: sql}));
}

function latentLink(sae, latent, text) {
  return el("a", {href: url("/latent", {sae, latent}), class: "latent-link",
                  "data-latent": latent, text: text === undefined ? `#${latent}` : text});
}

// colour scales: white -> blue (distributions), white -> orange (activations)
function blues(t) {
  t = Math.max(0, Math.min(1, t));
  const c0 = [247, 251, 255], c1 = [8, 48, 107];
  const c = c0.map((v, i) => Math.round(v + (c1[i] - v) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
function orange(t) {
  t = Math.max(0, Math.min(1, t));
  return `rgba(255,120,20,${(0.08 + 0.82 * t).toFixed(3)})`;
}

// ----------------------------------------------------------------------------- charts

function lineChart(title, xs, ys, {width = 230, height = 150, xlabel = "layer"} = {}) {
  const m = {l: 42, r: 8, t: 18, b: 28};
  const w = width - m.l - m.r, h = height - m.t - m.b;
  const finite = ys.filter(v => v !== null && Number.isFinite(v));
  let lo = Math.min(0, ...finite), hi = Math.max(...finite, lo + 1e-9);
  if (!finite.length) { lo = 0; hi = 1; }
  const x = i => m.l + (xs.length > 1 ? (i / (xs.length - 1)) * w : w / 2);
  const y = v => m.t + h - ((v - lo) / (hi - lo)) * h;
  const svg = sv("svg", {width, height, class: "chart", "data-title": title});
  svg.append(sv("text", {x: m.l, y: 12, text: title, "font-weight": 600}));
  svg.append(sv("line", {class: "axis", x1: m.l, y1: m.t + h, x2: m.l + w, y2: m.t + h}));
  svg.append(sv("line", {class: "axis", x1: m.l, y1: m.t, x2: m.l, y2: m.t + h}));
  svg.append(sv("text", {x: m.l - 4, y: m.t + 4, "text-anchor": "end", text: fmt(hi, 2)}));
  svg.append(sv("text", {x: m.l - 4, y: m.t + h, "text-anchor": "end", text: fmt(lo, 2)}));
  xs.forEach((v, i) => svg.append(sv("text", {x: x(i), y: m.t + h + 13, "text-anchor": "middle", text: v})));
  svg.append(sv("text", {x: m.l + w / 2, y: height - 2, "text-anchor": "middle", class: "muted", text: xlabel}));
  const pts = ys.map((v, i) => (v === null ? null : [x(i), y(v)])).filter(Boolean);
  if (pts.length) {
    svg.append(sv("polyline", {points: pts.map(p => p.join(",")).join(" "), fill: "none",
                               stroke: "#2457c5", "stroke-width": 2}));
    ys.forEach((v, i) => { if (v !== null) svg.append(sv("circle", {cx: x(i), cy: y(v), r: 3, fill: "#2457c5"},
      sv("title", {text: `${xs[i]}: ${fmt(v, 4)}`}))); });
  }
  return svg;
}

function barChart(title, labels, values, {width = 300, height = 160, xlabel = "layer", cls = "bars"} = {}) {
  const m = {l: 42, r: 8, t: 18, b: 28};
  const w = width - m.l - m.r, h = height - m.t - m.b;
  const hi = Math.max(...values, 1e-12);
  const bw = w / Math.max(values.length, 1);
  const svg = sv("svg", {width, height, class: cls, "data-title": title});
  svg.append(sv("text", {x: m.l, y: 12, text: title, "font-weight": 600}));
  svg.append(sv("line", {class: "axis", x1: m.l, y1: m.t + h, x2: m.l + w, y2: m.t + h}));
  svg.append(sv("text", {x: m.l - 4, y: m.t + 4, "text-anchor": "end", text: fmt(hi, 2)}));
  values.forEach((v, i) => {
    const bh = (v / hi) * h;
    svg.append(sv("rect", {class: "bar", x: m.l + i * bw + 2, y: m.t + h - bh, width: Math.max(bw - 4, 1),
                           height: bh, fill: "#2457c5"}, sv("title", {text: `${labels[i]}: ${fmt(v, 4)}`})));
    svg.append(sv("text", {x: m.l + i * bw + bw / 2, y: m.t + h + 13, "text-anchor": "middle", text: labels[i]}));
  });
  svg.append(sv("text", {x: m.l + w / 2, y: height - 2, "text-anchor": "middle", text: xlabel}));
  return svg;
}

// Heatmap of p (rows: latents in rank order, columns: layers). Row labels open the latent;
// clicking a cell picks the latent for the token colouring.
function heatmap(sae, rows, layers, onPick) {
  const byLatent = new Map();
  for (const r of rows) {
    if (!byLatent.has(r.latent)) byLatent.set(r.latent, {latent: r.latent, rank: r.rank,
      expected: r.expected_layer, max: r.max_value, p: new Array(layers.length).fill(0)});
    byLatent.get(r.latent).p[r.layer_idx] = r.p;
  }
  const latents = [...byLatent.values()].sort((a, b) => a.rank - b.rank);
  const rowH = latents.length > 60 ? 9 : 14, cellW = 46;
  const m = {l: 64, t: 20, r: 60, b: 24};
  const width = m.l + cellW * layers.length + m.r, height = m.t + rowH * latents.length + m.b;
  const svg = sv("svg", {id: "heatmap-svg", width, height, "data-layers": layers.length,
                         "data-latents": latents.length});
  layers.forEach((layer, li) => svg.append(sv("text", {x: m.l + li * cellW + cellW / 2, y: m.t - 6,
    "text-anchor": "middle", text: `L${layer}`})));
  latents.forEach((row, i) => {
    const y = m.t + i * rowH;
    const link = sv("a", {href: url("/latent", {sae, latent: row.latent}), class: "heat-label",
                          "data-latent": row.latent},
      sv("text", {x: m.l - 4, y: y + rowH - 2, "text-anchor": "end", "font-size": rowH > 10 ? 11 : 8,
                  text: `#${row.latent}`}));
    svg.append(link);
    row.p.forEach((p, li) => {
      svg.append(sv("rect", {class: "cell", x: m.l + li * cellW, y, width: cellW - 1, height: rowH - 1,
        fill: blues(p), "data-latent": row.latent, "data-layer": layers[li],
        onclick: () => onPick(row.latent)},
        sv("title", {text: `latent ${row.latent}, layer ${layers[li]}: p = ${fmt(p, 3)} ` +
                           `(expected layer ${fmt(row.expected, 2)}, max ${fmt(row.max, 3)})`})));
    });
    svg.append(sv("text", {x: m.l + cellW * layers.length + 4, y: y + rowH - 2, "font-size": rowH > 10 ? 10 : 7,
                           class: "muted", text: `E=${fmt(row.expected, 1)}`}));
  });
  return svg;
}

function miniBars(values, max) {
  const w = 8 * values.length + 2, svg = sv("svg", {width: w, height: 16, class: "mini"});
  values.forEach((v, i) => {
    const h = max > 0 ? (v / max) * 14 : 0;
    svg.append(sv("rect", {x: 1 + i * 8, y: 15 - h, width: 6, height: h, fill: "#ff7814"},
      sv("title", {text: `layer idx ${i}: ${fmt(v, 3)}`})));
  });
  return svg;
}

// ----------------------------------------------------------------------------- home

async function homeView(app) {
  const saes = await api("/api/saes");
  const chosen = params().get("sae") || (saes[0] && saes[0].sae_id);
  document.title = "mlsae explorer";
  app.replaceChildren(el("h1", {text: "Autoencoders in this warehouse"}));
  if (!saes.length) {
    app.append(el("p", {text: "No autoencoders yet: run `mlsae run --out WAREHOUSE` first."}));
    return;
  }
  const table = el("table", {id: "sae-table"},
    el("tr", {}, ["sae_id", "model", "R", "k", "latents", "layers", "lens", "train tokens"].map(
      h => el("th", {text: h}))));
  for (const s of saes) {
    table.append(el("tr", {class: s.sae_id === chosen ? "selected" : null, "data-sae": s.sae_id},
      el("td", {}, el("a", {href: url("/", {sae: s.sae_id}), text: s.sae_id})),
      el("td", {text: s.model}), el("td", {class: "num", text: fmt(s.expansion_factor)}),
      el("td", {class: "num", text: fmt(s.k)}), el("td", {class: "num", text: fmt(s.n_latents)}),
      el("td", {text: JSON.stringify(s.layers)}), el("td", {text: s.lens || "none"}),
      el("td", {class: "num", text: fmt(s.train_tokens)})));
  }
  app.append(panel("Autoencoders", "saes", table));
  const sae = saes.find(s => s.sae_id === chosen) || saes[0];

  const form = el("form", {id: "prompt-form", class: "inline"},
    el("textarea", {id: "prompt-text", name: "text", maxlength: 4000}),
    el("button", {id: "prompt-submit", type: "submit", text: "Analyse prompt"}));
  form.querySelector("textarea").value = DEFAULT_PROMPT;
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    location.href = url("/prompt", {sae: sae.sae_id, text: form.querySelector("textarea").value});
  });
  const jump = el("form", {id: "latent-form", class: "inline"},
    el("label", {text: "Open latent "}),
    el("input", {id: "latent-number", type: "number", min: 0, max: sae.n_latents - 1, value: 0}),
    el("button", {type: "submit", text: "Open"}));
  jump.addEventListener("submit", ev => {
    ev.preventDefault();
    location.href = url("/latent", {sae: sae.sae_id, latent: jump.querySelector("input").value});
  });
  app.append(panel(`Explore ${sae.sae_id}`, "explore", form, el("p"), jump));

  const metrics = sae.layer_metrics.rows;
  const charts = el("div", {class: "row", id: "metrics-charts"});
  const xs = metrics.map(r => r.layer);
  for (const [key, title] of [["fvu", "FVU"], ["delta_ce", "Δ CE (nats)"], ["kl", "KL"],
                              ["l0", "L0"], ["dead_fraction", "dead fraction"]]) {
    charts.append(lineChart(title, xs, metrics.map(r => r[key])));
  }
  app.append(panel(`Per-layer metrics (${sae.sae_id})`, "metrics",
    metrics.length ? charts : el("p", {class: "muted", text: "No evaluation logged for this SAE."}),
    sqlBlock(sae.layer_metrics.sql)));

  const summary = sae.variance_summary.rows[0];
  const kv = el("table", {class: "kv", id: "variance-table"});
  if (summary) for (const [k, v] of Object.entries(summary)) {
    if (k !== "sae_id") kv.append(el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: fmt(v, 4)})));
  }
  app.append(panel("Variance summary (SPEC 5)", "variance",
    summary ? kv : el("p", {class: "muted", text: "No latents logged for this SAE."}),
    sqlBlock(sae.variance_summary.sql)));
}

// ----------------------------------------------------------------------------- prompt

async function promptView(app) {
  const q = params();
  const sae = q.get("sae"), text = q.get("text") || DEFAULT_PROMPT;
  const layerParam = q.get("layer");
  const steer = q.get("steer_latent") !== null && q.get("steer_latent") !== "" ? {
    latent: Number(q.get("steer_latent")), layer: Number(q.get("steer_layer")),
    factor: Number(q.get("steer_factor"))} : null;
  document.title = "prompt · mlsae explorer";
  const form = el("form", {id: "prompt-form", class: "inline"},
    el("textarea", {id: "prompt-text", name: "text", maxlength: 4000}),
    el("button", {id: "prompt-submit", type: "submit", text: "Analyse prompt"}));
  form.querySelector("textarea").value = text;
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    location.href = url("/prompt", {sae, text: form.querySelector("textarea").value, layer: layerParam});
  });
  app.replaceChildren(el("h1", {}, "Prompt · ", el("a", {href: url("/", {sae}), text: sae})),
                      panel("Prompt", "prompt-panel", form));
  const body = {sae_id: sae, text};
  if (layerParam !== null && layerParam !== "") body.layer = Number(layerParam);
  if (steer) body.steer = steer;
  const data = await api("/api/prompt", body);
  renderPrompt(app, data, q);
}

function renderPrompt(app, data, q) {
  const sae = data.sae_id, layers = data.layers, L = layers.length;
  const counted = data.tokens.map(t => t.counted);
  // state: colouring latent + layer, selected position
  const heatRows = data.heatmap.rows;
  const byMass = [...new Map(heatRows.map(r => [r.latent, r])).values()].sort((a, b) => b.mass - a.mass);
  const state = {
    latent: q.get("latent") !== null && q.get("latent") !== "" ? Number(q.get("latent"))
            : (byMass[0] ? byMass[0].latent : 0),
    layer: data.logits.layer,
    pos: q.get("pos") !== null ? Math.min(Number(q.get("pos")), data.tokens.length - 1) : data.tokens.length - 1,
  };
  const layerIdx = () => layers.indexOf(state.layer);
  const valueAt = (t, li, j) => {
    for (const [latent, v] of data.activations[t][li]) if (latent === j) return v;
    return 0;
  };

  // controls
  const layerSelect = el("select", {id: "layer-select"},
    layers.map(l => el("option", {value: l, text: `layer ${l}`, selected: l === state.layer})));
  const latentInput = el("input", {id: "latent-input", type: "number", min: 0, max: data.n_latents - 1,
                                   value: state.latent});
  layerSelect.addEventListener("change", () => {
    location.href = url("/prompt", {...Object.fromEntries(params()), layer: layerSelect.value});
  });
  latentInput.addEventListener("change", () => { state.latent = Number(latentInput.value); redraw(); });
  const controls = el("div", {class: "inline", id: "controls"},
    el("label", {}, "Layer (colouring and reconstruction) ", layerSelect), " ",
    el("label", {}, "Latent ", latentInput), " ",
    el("span", {id: "latent-open"}));

  // tokens
  const tokenBox = el("div", {class: "tokens", id: "tokens", "data-n-tokens": data.tokens.length});
  const tokenSpans = data.tokens.map((t, i) => {
    const span = el("span", {class: "tok" + (t.counted ? "" : " masked"), "data-pos": i,
                             text: visible(t.text)});
    span.addEventListener("click", () => { state.pos = i; redraw(); });
    return span;
  });
  tokenBox.append(...tokenSpans);
  const tokenLegend = el("p", {class: "muted", id: "token-legend"});

  // heatmap
  const heatBox = el("div", {id: "heatmap", "data-layers": L});
  heatBox.append(heatRows.length ? heatmap(sae, heatRows, layers, j => { state.latent = j; redraw(); })
                 : el("p", {class: "muted", text: "No latent reaches 1e-3 on this prompt."}),
                 el("p", {class: "muted", text: "p(layer) of each latent pooled over the prompt's tokens, " +
                   "latents with max activation < 1e-3 left out, rows by expected layer E. " +
                   "Click a label to open the latent, a cell to colour the tokens by it."}));

  // histograms
  const activePerLayer = layers.map((_, li) => data.activations.reduce(
    (s, tok) => s + tok[li].filter(([, v]) => v > ACT_THRESHOLD).length, 0));
  const nCounted = counted.filter(Boolean).length || 1;
  const expected = new Array(L).fill(0);
  for (const r of byMass) expected[Math.min(L - 1, Math.round(r.expected_layer))] += 1;
  const hist = el("div", {class: "row", id: "histograms"},
    barChart("active latents per token (L0)", layers.map(String), activePerLayer.map(v => v / nCounted)),
    barChart("latents by expected layer (prompt)", layers.map(String), expected, {xlabel: "expected layer (rounded)"}));

  // per-position panels
  const topBox = el("div", {id: "top-latents"});
  const logitBox = el("div", {id: "logits", class: "logits"});

  // steering form
  const s = data.logits.steer;
  const steerForm = el("form", {id: "steer-form", class: "inline"},
    el("label", {}, "latent ", el("input", {name: "latent", type: "number", min: 0, max: data.n_latents - 1,
                                          value: s ? s.latent : state.latent})),
    el("label", {}, "layer ", el("select", {name: "layer"}, layers.map(l => el("option", {
      value: l, text: String(l), selected: s ? l === s.layer : l === state.layer})))),
    el("label", {}, "factor ", el("input", {name: "factor", type: "number", step: "any",
                                          value: s ? s.factor : 10})),
    el("button", {type: "submit", id: "steer-submit", text: "Steer"}));
  steerForm.addEventListener("submit", ev => {
    ev.preventDefault();
    const f = new FormData(steerForm);
    location.href = url("/prompt", {...Object.fromEntries(params()), steer_latent: f.get("latent"),
                                    steer_layer: f.get("layer"), steer_factor: f.get("factor")});
  });

  const cost = c => c && c.delta_ce !== null ? `Δ CE ${fmt(c.delta_ce, 4)}, KL ${fmt(c.kl, 4)} over ${c.positions} positions` : "";
  app.append(
    panel("Tokens", "tokens-panel", controls, tokenBox, tokenLegend),
    el("div", {class: "grid"},
      panel("Layer distribution of the prompt's latents (Fig. 3)", "heatmap-panel", heatBox,
            sqlBlock(data.heatmap.sql, "SQL (sql/prompt_heatmap.sql, run over this prompt's activations as sequence 0)")),
      el("div", {},
        panel("Top latents at the selected token", "top-panel", topBox),
        panel("Per-prompt layer histograms", "hist-panel", hist))),
    panel("Next-token predictions at the selected token", "logits-panel",
      el("p", {class: "muted", id: "logit-costs"},
         `Reconstruction at layer ${data.logits.layer}: ${cost(data.logits.reconstructed_cost)}` +
         (data.logits.steered_cost ? ` · Steering: ${cost(data.logits.steered_cost)}` : "")),
      logitBox, el("h2", {text: "Steering"}), steerForm));

  function predictions(title, list) {
    const t = el("table", {class: "pred"}, el("tr", {}, el("th", {text: "token"}), el("th", {class: "num", text: "prob"}),
                                                 el("th", {class: "num", text: "logit"})));
    for (const p of list) t.append(el("tr", {}, el("td", {text: JSON.stringify(p.token)}),
      el("td", {class: "num", text: fmt(p.prob, 3)}), el("td", {class: "num", text: fmt(p.logit, 2)})));
    return el("div", {}, el("h3", {text: title}), t);
  }

  function redraw() {
    latentInput.value = state.latent;
    const li = layerIdx();
    let max = 0;
    const vals = data.tokens.map((t, i) => { const v = t.counted ? valueAt(i, li, state.latent) : 0; max = Math.max(max, v); return v; });
    tokenSpans.forEach((span, i) => {
      span.style.background = vals[i] > 0 ? orange(max > 0 ? vals[i] / max : 0) : "";
      span.title = `pos ${i} · token id ${data.tokens[i].id} · latent ${state.latent} at layer ${state.layer}: ${fmt(vals[i], 4)}`;
      span.dataset.value = vals[i];
      span.classList.toggle("current", i === state.pos);
    });
    tokenLegend.textContent = `Coloured by latent ${state.latent} at layer ${state.layer} (max ${fmt(max, 3)} on this prompt). Click a token to see its top latents and predictions.`;
    document.getElementById("latent-open").replaceChildren(latentLink(sae, state.latent, `open latent ${state.latent} →`));
    // top latents at pos
    const tops = data.top_latents[state.pos];
    const tokenText = data.tokens[state.pos].text;
    const maxV = Math.max(1e-9, ...tops.flatMap(r => r.per_layer));
    const table = el("table", {id: "top-table"}, el("tr", {}, el("th", {text: "latent"}),
      el("th", {class: "num", text: "sum"}), el("th", {text: `per layer ${layers[0]}…${layers[L - 1]}`})));
    for (const r of tops) {
      const pick = el("a", {href: "#", text: "colour", class: "muted"});
      pick.addEventListener("click", ev => { ev.preventDefault(); state.latent = r.latent; redraw(); });
      table.append(el("tr", {}, el("td", {}, latentLink(sae, r.latent), " ", pick),
        el("td", {class: "num", text: fmt(r.total, 3)}), el("td", {}, miniBars(r.per_layer, maxV))));
    }
    topBox.replaceChildren(el("p", {}, `Token ${state.pos}: `, el("code", {text: JSON.stringify(tokenText)})),
                           tops.length ? table : el("p", {class: "muted", text: "(a special token: not analysed)"}));
    const lg = data.logits;
    logitBox.replaceChildren(
      predictions("clean", lg.clean[state.pos]),
      predictions(`layer ${lg.layer} reconstructed`, lg.reconstructed[state.pos]),
      lg.steered ? predictions(`steered: latent ${lg.steer.latent} × ${lg.steer.factor} at layer ${lg.steer.layer}`,
                               lg.steered[state.pos])
                 : el("div", {}, el("h3", {text: "steered"}), el("p", {class: "muted", text: "Use the form below."})));
    const p = params(); p.set("latent", state.latent); p.set("pos", state.pos);
    history.replaceState(null, "", `/prompt?${p.toString()}`);
  }
  redraw();
}

// ----------------------------------------------------------------------------- latent

async function latentView(app) {
  const q = params();
  const sae = q.get("sae"), latent = Number(q.get("latent"));
  document.title = `latent ${latent} · mlsae explorer`;
  const data = await api(`/api/latent/${encodeURIComponent(sae)}/${encodeURIComponent(q.get("latent"))}`);
  const layers = data.layers;
  app.replaceChildren(el("h1", {}, `Latent ${latent} · `, el("a", {href: url("/", {sae}), text: sae})));

  const dist = data.distribution.rows;
  const distChart = barChart("p_j(layer), aggregated over the logged tokens", dist.map(r => String(r.layer)),
                             dist.map(r => r.p), {width: 360, cls: "bars dist"});
  const stats = data.stats.rows[0];
  const kv = el("table", {class: "kv", id: "latent-stats"});
  if (stats) for (const [k, v] of Object.entries(stats)) kv.append(el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: fmt(v, 4)})));

  const contexts = el("div", {id: "contexts"});
  let lastLayer = null;
  for (const c of data.contexts.rows) {
    if (c.layer !== lastLayer) { contexts.append(el("h3", {text: `layer ${c.layer}`})); lastLayer = c.layer; }
    const line = el("div", {class: "context", "data-layer": c.layer, "data-seq": c.seq_id, "data-pos": c.pos,
                            title: "open as a prompt"});
    line.append(el("span", {class: "muted", text: `${fmt(c.value, 3)}  `}));
    c.tokens.forEach((tok, i) => line.append(c.positions[i] === c.pos ? el("mark", {text: visible(tok)}) : visible(tok)));
    line.addEventListener("click", () => {
      location.href = url("/prompt", {sae, text: c.tokens.join(""), latent, layer: c.layer,
                                      pos: c.positions.indexOf(c.pos)});
    });
    contexts.append(line);
  }

  const nearest = el("table", {id: "nearest"}, el("tr", {}, el("th", {text: "latent"}), el("th", {class: "num", text: "cosine"})));
  for (const n of data.nearest) nearest.append(el("tr", {}, el("td", {}, latentLink(sae, n.latent)), el("td", {class: "num", text: fmt(n.cosine, 3)})));
  const tokTable = (list, id) => {
    const t = el("table", {id}, el("tr", {}, el("th", {text: "token"}), el("th", {class: "num", text: "W_U·d"})));
    for (const x of list) t.append(el("tr", {}, el("td", {text: JSON.stringify(x.token)}), el("td", {class: "num", text: fmt(x.logit, 3)})));
    return t;
  };

  app.append(
    el("div", {class: "grid"},
      panel("Layer distribution", "distribution-panel", distChart, sqlBlock(data.distribution.sql)),
      panel("Statistics (latent_stats)", "stats-panel",
            stats ? kv : el("p", {class: "muted", text: "Never active on the logged tokens (dead there)."}),
            sqlBlock(data.stats.sql))),
    panel("Top activating contexts per layer (click one to open it as a prompt)", "contexts-panel",
          data.contexts.rows.length ? contexts : el("p", {class: "muted", text: "No logged activations."}),
          sqlBlock(data.contexts.sql)),
    el("div", {class: "grid"},
      panel("Nearest latents (decoder cosine)", "nearest-panel", data.weights_note ? el("p", {class: "muted", text: data.weights_note}) : nearest),
      panel("Tokens promoted through the unembedding", "promoted-panel", tokTable(data.tokens.promoted, "promoted")),
      panel("Tokens suppressed", "suppressed-panel", tokTable(data.tokens.suppressed, "suppressed"))));
}

// ----------------------------------------------------------------------------- router

async function main() {
  const app = document.getElementById("app");
  const views = {"/": homeView, "/prompt": promptView, "/latent": latentView};
  const view = views[location.pathname] || homeView;
  const sae = params().get("sae");
  const nav = document.getElementById("nav");
  if (sae) nav.replaceChildren(el("a", {href: url("/", {sae}), text: "autoencoder"}),
                               el("a", {href: url("/prompt", {sae, text: DEFAULT_PROMPT}), text: "prompt"}));
  try {
    showError(null);
    await view(app);
    document.body.dataset.ready = "1";
  } catch (e) {
    showError(e.message);
    document.body.dataset.ready = "error";
  }
}

main();
