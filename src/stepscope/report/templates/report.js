
(function () {
  "use strict";
  var status = document.getElementById("stepscope-status");
  var errors = [];
  function report(msg) {
    errors.push(String(msg));
    status.setAttribute("data-errors", String(errors.length));
    var pre = document.getElementById("stepscope-errors");
    pre.textContent = "report error: " + errors.join("\n");
    pre.hidden = false;
  }
  window.addEventListener("error", function (e) { report(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) { report(e.reason); });

  var $ = function (id) { return document.getElementById(id); };
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    var a = Math.abs(v);
    return (a >= 1e4 || a < 1e-3) ? v.toExponential(2) : v.toPrecision(3);
  }

  var DATA, R, cur = 0, maps = {}, layerIdx = 0, normMode = false, lastCell = null;

  function decode(r, k) {
    var key = cur + ":" + k;
    if (maps[key]) return maps[key];
    var enc = r.layers[k], S = r.S, bin = atob(enc.data), n = S * S;
    var out = new Float64Array(n), span = enc.hi - enc.lo;
    for (var i = 0; i < n; i++) {
      var q = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
      out[i] = q === 0 ? 0 : Math.pow(10, enc.lo + (q - 1) / DATA.qmax * span);
    }
    maps[key] = out;
    return out;
  }
  function rowNormalized(m, S) {
    var out = new Float64Array(S * S);
    for (var i = 0; i < S; i++) {
      var s = 0;
      for (var j = 0; j < S; j++) s += m[i * S + j];
      if (s > 0) for (var j2 = 0; j2 < S; j2++) out[i * S + j2] = m[i * S + j2] / s;
    }
    return out;
  }
  function current() {
    var m = decode(R, layerIdx);
    return normMode ? rowNormalized(m, R.S) : m;
  }
  function band(layer) {
    if (R.groups.shallow.indexOf(layer) >= 0) return "shallow";
    if (R.groups.deep.indexOf(layer) >= 0) return "deep";
    return "";
  }

  function drawHeat() {
    var S = R.S, m = current(), lut = DATA.viridis;
    var max = 0, min = Infinity;
    for (var i = 0; i < m.length; i++) { var v = m[i]; if (v > 0) { if (v > max) max = v; if (v < min) min = v; } }
    var hi = max > 0 ? Math.log10(max) : 0;
    var lo = max > 0 ? Math.max(Math.log10(min), hi - 6) : -1;
    if (hi - lo < 1e-12) lo = hi - 1;
    var off = document.createElement("canvas");
    off.width = S; off.height = S;
    var octx = off.getContext("2d"), img = octx.createImageData(S, S), px = img.data, cells = 0;
    for (var c = 0; c < S * S; c++) {
      var val = m[c], o = 4 * c;
      if (val > 0) {
        var t = (Math.log10(val) - lo) / (hi - lo);
        var k = Math.max(0, Math.min(255, Math.round(t * 255)));
        px[o] = lut[3 * k]; px[o + 1] = lut[3 * k + 1]; px[o + 2] = lut[3 * k + 2]; cells++;
      } else { px[o] = 240; px[o + 1] = 240; px[o + 2] = 240; }
      px[o + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    var cell = Math.max(1, Math.floor(520 / S)), size = cell * S;
    var cv = $("heat");
    cv.width = size; cv.height = size;
    var ctx = cv.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, size, size);
    for (var b = 1; b < S; b++) {
      if (R.kinds[b] !== R.kinds[b - 1]) {
        var x = b * size / S;
        ctx.fillStyle = "#ffffff";
        ctx.fillRect(x - 1, 0, 2, size); ctx.fillRect(0, x - 1, size, 2);
        ctx.fillStyle = "#000000";
        ctx.fillRect(x - 0.25, 0, 0.5, size); ctx.fillRect(0, x - 0.25, size, 0.5);
      }
    }
    var lg = $("lg"), lctx = lg.getContext("2d");
    for (var g = 0; g < lg.width; g++) {
      var kk = Math.round(g / (lg.width - 1) * 255);
      lctx.fillStyle = "rgb(" + lut[3 * kk] + "," + lut[3 * kk + 1] + "," + lut[3 * kk + 2] + ")";
      lctx.fillRect(g, 0, 1, lg.height);
    }
    $("lg-lo").textContent = fmt(Math.pow(10, lo));
    $("lg-hi").textContent = fmt(Math.pow(10, hi));
    var layer = R.layers[layerIdx].layer, bd = band(layer);
    $("layer-label").textContent = "layer " + R.layer_ids[layer] + " of " + R.depth + (bd ? " (" + bd + ")" : "");
    status.setAttribute("data-cells", String(cells));
    status.setAttribute("data-layer", String(R.layer_ids[layer]));
    var rows = $("table").querySelectorAll("tbody tr");
    for (var r = 0; r < rows.length; r++) rows[r].classList.toggle("cur", r === layer);
    drawChart();
  }

  function renderAxes() {
    // step numbers beside the heatmap, at the middle of their cells (percentages follow a shrunk canvas)
    [["heat-x", "left", "key step j"], ["heat-y", "top", "query step i"]].forEach(function (a) {
      var box = $(a[0]);
      box.textContent = "";
      R.step_ticks.forEach(function (t) {
        var s = el("span", t, "tick");
        s.style[a[1]] = ((t + 0.5) / R.S * 100) + "%";
        box.appendChild(s);
      });
      box.appendChild(el("span", a[2], "title"));
    });
    status.setAttribute("data-axis-ticks", R.step_ticks.join(","));
  }

  function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  function setHighlight(cls, idx) {
    var old = $("text").querySelectorAll("." + cls);
    for (var i = 0; i < old.length; i++) old[i].classList.remove(cls);
    if (idx !== null) { var e = $("text").children[idx]; if (e) e.classList.add(cls); }
  }
  function onMove(ev) {
    var cv = $("heat"), rect = cv.getBoundingClientRect(), S = R.S;
    var j = Math.floor((ev.clientX - rect.left) / rect.width * S);
    var i = Math.floor((ev.clientY - rect.top) / rect.height * S);
    var tip = $("tip");
    if (i < 0 || j < 0 || i >= S || j >= S) { hideTip(); return; }
    var raw = decode(R, layerIdx), rowSum = 0;
    for (var k = 0; k < S; k++) rowSum += raw[i * S + k];
    tip.textContent = "";
    var head = el("b", "query step " + i + " (" + R.kinds[i] + ") \u2192 key step " + j + " (" + R.kinds[j] + ")");
    tip.appendChild(head);
    tip.appendChild(el("div", "M = " + fmt(raw[i * S + j]) + "   N = " + fmt(rowSum > 0 ? raw[i * S + j] / rowSum : 0)));
    tip.appendChild(el("div", "\u25B6 step " + i + ": " + clip(R.texts[i], 280)));
    tip.appendChild(el("div", "\u25C0 step " + j + ": " + clip(R.texts[j], 280)));
    tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + 470 > window.innerWidth) x = Math.max(0, ev.clientX - 480);
    tip.style.left = x + "px"; tip.style.top = y + "px";
    if (!lastCell || lastCell[0] !== i || lastCell[1] !== j) {
      setHighlight("hl-row", i); setHighlight("hl-col", j); lastCell = [i, j];
    }
  }
  function hideTip() { $("tip").hidden = true; setHighlight("hl-row", null); setHighlight("hl-col", null); lastCell = null; }

  function renderMeta() {
    var meta = R.meta, dl = $("meta"), d = R.diagnosis;
    dl.textContent = "";
    var add = function (k, v) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v)); };
    Object.keys(meta).forEach(function (k) {
      var v = meta[k];
      add(k, Array.isArray(v) ? v.join("; ") : (typeof v === "string" ? clip(v, 1200) : String(v)));
    });
    add("steps", R.S + " (question " + d.step_counts.question + ", thinking " + d.step_counts.thinking +
        ", summary " + d.step_counts.summary + ")");
    var ids = R.layer_ids, span = function (g) { return g.length ? ids[g[0]] + "\u2013" + ids[g[g.length - 1]] : "none"; };
    add("layers", R.L + " of " + R.depth + " (shallow " + span(R.groups.shallow) + ", deep " + span(R.groups.deep) + ")");
    var v = $("verdict");
    if (d.verdict) {
      v.textContent = "Verdict: " + d.verdict.summary;
      v.className = "verdict" + (d.verdict.summary.indexOf("beyond") >= 0 ? " flagged" : "");
    } else {
      v.textContent = "No verdict: diagnose against a baseline profile (stepscope diagnose --baseline) to flag a single trace.";
      v.className = "verdict";
    }
    var sc = $("scores");
    sc.textContent = "";
    DATA.scores.forEach(function (k) {
      var val = d.scores[k], z = d.score_z ? d.score_z[k] : null, f = d.score_flags ? d.score_flags[k] : null;
      var txt = k + " = " + fmt(val) + (z !== null && z !== undefined ? " (z " + (z >= 0 ? "+" : "") + z.toFixed(2) + ")" : "");
      sc.appendChild(el("span", txt, "pill" + (f ? " flagged" : (f === false ? " ok" : ""))));
    });
    if (d.verdict) {
      ["shallow_lock_in", "deep_decay"].forEach(function (k) {
        var p = d.verdict[k];
        sc.appendChild(el("span", k.replace(/_/g, " ") + ": " + p.status + " \u2014 " + p.reason,
                          "pill" + (p.status === "flagged" ? " flagged" : "")));
      });
    }
    var ul = $("reasons");
    ul.textContent = "";
    Object.keys(d.reasons).sort().forEach(function (k) { ul.appendChild(el("li", k + " is null: " + d.reasons[k])); });
    $("omitted").textContent = R.omitted_layers > 0 ? (R.omitted_layers + " of " + R.L +
      " layers were left out of this file to keep it small (the slider shows the embedded ones).") : "";
  }

  function renderTable() {
    var t = $("table"), d = R.diagnosis;
    t.textContent = "";
    var thead = el("thead"), tr = el("tr");
    tr.appendChild(el("th", "layer"));
    DATA.metrics.forEach(function (m) { var th = el("th", m); th.title = DATA.metric_help[m]; tr.appendChild(th); });
    thead.appendChild(tr); t.appendChild(thead);
    var tb = el("tbody");
    for (var l = 0; l < R.L; l++) {
      var row = el("tr", null, band(l));
      row.appendChild(el("td", R.layer_ids[l]));
      DATA.metrics.forEach(function (m) {
        var td = el("td", fmt(d.metrics[m][l]));
        if (d.flags && d.flags[m][l]) td.className = "flag";
        if (d.z && d.z[m][l] !== null) td.title = "z = " + d.z[m][l].toFixed(2);
        row.appendChild(td);
      });
      tb.appendChild(row);
    }
    t.appendChild(tb);
  }

  function renderText() {
    var box = $("text");
    box.textContent = "";
    var counts = {question: 0, thinking: 0, summary: 0};
    for (var i = 0; i < R.texts.length; i++) {
      var k = R.kinds[i];
      var s = el("span", R.texts[i], "step k-" + k + (counts[k]++ % 2 ? " odd" : " even"));
      s.title = "step " + i + " (" + k + "), tokens " + R.tokens[i][0] + "\u2013" + R.tokens[i][1];
      box.appendChild(s);
    }
    status.setAttribute("data-steps", String(box.children.length));
  }

  var SVGNS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function drawChart() {
    var c = $("chart"), m = $("metric").value, d = R.diagnosis, L = R.L;
    while (c.firstChild) c.removeChild(c.firstChild);
    var W = 480, H = 300, pl = 56, pr = 12, pt = 12, pb = 32;
    var ids = R.layer_ids, lo0 = ids[0], hi0 = ids[L - 1];
    var base = DATA.baseline && JSON.stringify(DATA.baseline.layers) === JSON.stringify(ids) ? DATA.baseline.metrics[m] : null;
    var ys = d.metrics[m];
    var vals = [];
    for (var l = 0; l < L; l++) {
      if (ys[l] !== null) vals.push(ys[l]);
      if (base && base.mean[l] !== null && base.std[l] !== null) { vals.push(base.mean[l] - 2 * base.std[l]); vals.push(base.mean[l] + 2 * base.std[l]); }
    }
    $("metric-help").textContent = DATA.metric_help[m];
    var X = function (l) { return pl + (hi0 > lo0 ? (ids[l] - lo0) / (hi0 - lo0) : 0.5) * (W - pl - pr); };
    var bandRect = function (ls, color) {
      if (!ls.length) return;
      c.appendChild(svg("rect", {x: X(ls[0]) - 3, y: pt, width: X(ls[ls.length - 1]) - X(ls[0]) + 6, height: H - pt - pb, fill: color, "fill-opacity": 0.08}));
    };
    bandRect(R.groups.shallow, "#6a4c93"); bandRect(R.groups.deep, "#e07a1f");
    c.appendChild(svg("line", {x1: pl, y1: H - pb, x2: W - pr, y2: H - pb, stroke: "#999"}));
    c.appendChild(svg("line", {x1: pl, y1: pt, x2: pl, y2: H - pb, stroke: "#999"}));
    c.appendChild(svg("text", {x: (W + pl) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#666"}, "layer"));
    if (!vals.length) {
      c.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 12, fill: "#999"},
                        m + " is null for this trace" + (d.reasons[m] ? ": " + clip(d.reasons[m], 60) : "")));
      return;
    }
    var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    if (hi - lo < 1e-12) { lo -= 0.5 * Math.abs(lo) + 1e-6; hi += 0.5 * Math.abs(hi) + 1e-6; }
    var pad = 0.06 * (hi - lo); lo -= pad; hi += pad;
    var Y = function (v) { return pt + (hi - v) / (hi - lo) * (H - pt - pb); };
    [lo + pad, (lo + hi) / 2, hi - pad].forEach(function (v) {
      c.appendChild(svg("text", {x: pl - 4, y: Y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#666"}, fmt(v)));
    });
    for (var t = 0; t < L; t += Math.max(1, Math.ceil(L / 10))) {
      c.appendChild(svg("text", {x: X(t), y: H - pb + 13, "text-anchor": "middle", "font-size": 10, fill: "#666"}, ids[t]));
    }
    if (base) {
      var up = [], dn = [];
      for (var b = 0; b < L; b++) if (base.mean[b] !== null && base.std[b] !== null) {
        up.push(X(b) + "," + Y(base.mean[b] + 2 * base.std[b])); dn.unshift(X(b) + "," + Y(base.mean[b] - 2 * base.std[b]));
      }
      if (up.length) c.appendChild(svg("polygon", {points: up.concat(dn).join(" "), fill: "#888", "fill-opacity": 0.18}));
    }
    var seg = [];
    var flush = function () { if (seg.length > 1) c.appendChild(svg("polyline", {points: seg.join(" "), fill: "none", stroke: "#1982c4", "stroke-width": 1.8})); seg = []; };
    for (var q = 0; q < L; q++) { if (ys[q] === null) { flush(); continue; } seg.push(X(q) + "," + Y(ys[q])); }
    flush();
    for (var p = 0; p < L; p++) {
      if (ys[p] === null) continue;
      c.appendChild(svg("circle", {cx: X(p), cy: Y(ys[p]), r: 2.5, fill: "#1982c4"}));
      if (d.flags && d.flags[m][p]) c.appendChild(svg("circle", {cx: X(p), cy: Y(ys[p]), r: 6, fill: "none", stroke: "#d62828", "stroke-width": 1.5}));
    }
    var curLayer = R.layers[layerIdx].layer;
    c.appendChild(svg("line", {x1: X(curLayer), y1: pt, x2: X(curLayer), y2: H - pb, stroke: "#d62828", "stroke-dasharray": "3,3"}));
  }

  function select(k) {
    cur = k; R = DATA.results[k]; layerIdx = 0;
    var s = $("layer");
    s.max = String(R.layers.length - 1); s.value = "0";
    renderMeta(); renderTable(); renderText(); renderAxes(); drawHeat();
  }

  function main() {
    DATA = JSON.parse($("stepscope-data").textContent);
    var pick = $("pick");
    DATA.results.forEach(function (r, i) { var o = el("option", r.label); o.value = String(i); pick.appendChild(o); });
    if (DATA.results.length < 2) $("pick-wrap").hidden = true;
    pick.addEventListener("change", function () { select(parseInt(pick.value, 10)); });
    var ms = $("metric");
    DATA.metrics.forEach(function (m) { var o = el("option", m); o.value = m; ms.appendChild(o); });
    ms.addEventListener("change", drawChart);
    $("layer").addEventListener("input", function () { layerIdx = parseInt($("layer").value, 10); drawHeat(); });
    $("norm").addEventListener("change", function () { normMode = $("norm").checked; drawHeat(); });
    $("heat").addEventListener("mousemove", onMove);
    $("heat").addEventListener("mouseleave", hideTip);
    status.setAttribute("data-results", String(DATA.results.length));
    select(0);
  }

  // Opened as report.html#stepscope-selftest, the page drives itself (hover a cell, move the slider, switch
  // results) and writes what it saw into #stepscope-status, for headless browser tests.
  function selfTest() {
    var cv = $("heat"), rect = cv.getBoundingClientRect(), S = R.S, i = S - 1, j = 0;
    status.setAttribute("data-first-steps", status.getAttribute("data-steps"));
    status.setAttribute("data-first-cells", status.getAttribute("data-cells"));
    cv.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: rect.left + (j + 0.5) * rect.width / S,
                                                  clientY: rect.top + (i + 0.5) * rect.height / S}));
    status.setAttribute("data-tip", $("tip").hidden ? "" : $("tip").textContent);
    status.setAttribute("data-highlighted", String($("text").querySelectorAll(".hl-row, .hl-col").length));
    cv.dispatchEvent(new MouseEvent("mouseleave"));
    var s = $("layer");
    s.value = s.max; s.dispatchEvent(new Event("input"));
    status.setAttribute("data-last-layer", status.getAttribute("data-layer"));
    $("norm").checked = true; $("norm").dispatchEvent(new Event("change"));
    status.setAttribute("data-norm-cells", status.getAttribute("data-cells"));
    if (DATA.results.length > 1) {
      var pick = $("pick");
      pick.value = String(DATA.results.length - 1); pick.dispatchEvent(new Event("change"));
      status.setAttribute("data-selected", R.label);
      status.setAttribute("data-selected-steps", status.getAttribute("data-steps"));
      pick.value = "0"; pick.dispatchEvent(new Event("change"));
    }
    status.setAttribute("data-selftest", "1");
  }

  try {
    main();
    if (window.location.hash === "#stepscope-selftest") selfTest();
    status.setAttribute("data-ok", errors.length ? "0" : "1");
  } catch (e) { report(e && e.stack ? e.stack : e); }
})();
