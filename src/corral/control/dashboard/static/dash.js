// corral dashboard: live updates (SSE), plots (uPlot), log tailing. No build step.
"use strict";
(function () {
  const plots = (window.corralPlots = {});
  const sparkCache = new Map(); // name -> {at, points}
  const SPARK_TTL = 30000;

  function fmtBytes(n) {
    if (n == null) return "-";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
  }
  function note(el, text) {
    el.innerHTML = "";
    const p = document.createElement("div");
    p.className = "none";
    p.textContent = text;
    el.appendChild(p);
  }
  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => r.json().then((body) => ({ ok: r.ok, status: r.status, body })));
  }
  function errorText(res) {
    const e = (res.body && res.body.error) || {};
    return (e.message || "HTTP " + res.status) + (e.hint ? " (hint: " + e.hint + ")" : "");
  }

  // --- metric plots -----------------------------------------------------------------------
  function metricPlot(el, range) {
    const kind = el.dataset.kind;
    const since = Math.floor(Date.now() / 1000) - range;
    getJSON(el.dataset.metrics + "?since=" + since).then((res) => {
      if (!res.ok) { note(el, "no history: " + errorText(res)); return; }
      const pts = res.body.points || [];
      const t = pts.map((p) => p.t);
      let data, series, axes;
      if (kind === "cpu") {
        data = [t, pts.map((p) => p.cpu_core_pct), pts.map((p) => p.cpu_host_pct)];
        series = [{}, { label: "% of a core", stroke: "#2563eb", width: 1.5 },
                  { label: "% of the host", stroke: "#f59e0b", width: 1.5 }];
        axes = [{}, { values: (u, vs) => vs.map((v) => v + "%") }];
      } else {
        data = [t, pts.map((p) => p.memory_bytes)];
        series = [{}, { label: "memory", stroke: "#059669", width: 1.5, value: (u, v) => fmtBytes(v) }];
        axes = [{}, { size: 84, values: (u, vs) => vs.map(fmtBytes) }];
      }
      el.innerHTML = "";
      const u = new uPlot({ title: kind === "cpu" ? "CPU" : "memory", width: 560, height: 200,
                            series, axes, scales: { x: { time: true } } }, data, el);
      el._uplot = u;
      plots[el.id] = u;
    }).catch((e) => note(el, "no history: " + e));
  }
  function allMetricPlots(range) {
    document.querySelectorAll("[data-metrics]").forEach((el) => metricPlot(el, range));
  }

  // --- sparklines on the fleet page ---------------------------------------------------------
  function drawSpark(el, pts) {
    el.innerHTML = "";
    if (!pts.length) return;
    const data = [pts.map((p) => p.t), pts.map((p) => p.cpu_core_pct)];
    el._uplot = new uPlot({ width: 120, height: 26, legend: { show: false }, cursor: { show: false },
      axes: [{ show: false }, { show: false }], scales: { x: { time: false } },
      series: [{}, { stroke: "#2563eb", width: 1, fill: "rgba(37,99,235,.12)" }] }, data, el);
  }
  function sparks() {
    document.querySelectorAll("[data-spark]").forEach((el) => {
      const name = el.dataset.spark;
      const hit = sparkCache.get(name);
      if (hit && Date.now() - hit.at < SPARK_TTL) { drawSpark(el, hit.points); return; }
      sparkCache.set(name, { at: Date.now(), points: hit ? hit.points : [] });
      const since = Math.floor(Date.now() / 1000) - 600;
      getJSON("/v1/instances/" + encodeURIComponent(name) + "/metrics?since=" + since).then((res) => {
        const points = res.ok ? res.body.points || [] : [];
        sparkCache.set(name, { at: Date.now(), points });
        document.querySelectorAll('[data-spark="' + CSS.escape(name) + '"]').forEach((e) => drawSpark(e, points));
      }).catch(() => {});
    });
  }

  // --- standby refresh sizes ----------------------------------------------------------------
  function syncPlot() {
    const el = document.getElementById("sync-plot");
    if (!el || el._uplot) return;
    const pts = JSON.parse(el.dataset.points || "[]").filter((p) => p.bytes != null);
    if (!pts.length) { note(el, "no refresh recorded yet"); return; }
    el._uplot = plots[el.id] = new uPlot({ title: "bytes per refresh", width: 560, height: 160,
      series: [{}, { label: "bytes", stroke: "#7c3aed", width: 1.5, points: { show: true },
                     value: (u, v) => fmtBytes(v) }],
      axes: [{}, { size: 70, values: (u, vs) => vs.map(fmtBytes) }], scales: { x: { time: true } } },
      [pts.map((p) => p.t), pts.map((p) => p.bytes)], el);
  }

  // --- traffic: rates polled while the page is open -----------------------------------------
  function traffic(el) {
    const t = [], hits = [], c2 = [], c3 = [], c4 = [], c5 = [];
    const u = new uPlot({ title: "hits/s by status class", width: 560, height: 200,
      series: [{}, { label: "hits/s", stroke: "#111827", width: 1.5 },
               { label: "2xx", stroke: "#16a34a" }, { label: "3xx", stroke: "#2563eb" },
               { label: "4xx", stroke: "#f59e0b" }, { label: "5xx", stroke: "#dc2626" }],
      scales: { x: { time: true } } }, [t, hits, c2, c3, c4, c5], el);
    el._uplot = plots[el.id] = u;
    function poll() {
      getJSON(el.dataset.traffic).then((res) => {
        if (!res.ok) return;
        const w = (res.body.windows || [])[0] || { hits_per_s: 0, class_per_s: {} };
        const c = w.class_per_s || {};
        t.push(res.body.at); hits.push(w.hits_per_s);
        c2.push(c["2xx"] || 0); c3.push(c["3xx"] || 0); c4.push(c["4xx"] || 0); c5.push(c["5xx"] || 0);
        if (t.length > 900) [t, hits, c2, c3, c4, c5].forEach((a) => a.shift());
        u.setData([t, hits, c2, c3, c4, c5]);
      }).catch(() => {});
    }
    poll();
    setInterval(poll, 2000);
  }

  // --- logs ---------------------------------------------------------------------------------
  function logs(el) {
    const seen = new Set();
    const src = new EventSource(el.dataset.logs);
    src.onmessage = (m) => {
      let l;
      try { l = JSON.parse(m.data); } catch (e) { return; }
      const key = l.source + ":" + l.seq;
      if (seen.has(key)) return;
      seen.add(key);
      const atEnd = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
      const line = document.createElement("div");
      line.className = "src-" + l.source;
      line.textContent = new Date(l.ts * 1000).toISOString().slice(11, 19) + " " +
        l.source + " " + l.line;
      el.appendChild(line);
      while (el.childNodes.length > 1000) el.removeChild(el.firstChild);
      if (seen.size > 5000) seen.clear();
      if (atEnd) el.scrollTop = el.scrollHeight;
    };
  }

  // --- the event stream: live updates everywhere --------------------------------------------
  function live() {
    const table = document.getElementById("events");
    const q = new URLSearchParams();
    if (table && table.dataset.type) q.set("type", table.dataset.type);
    if (table && table.dataset.instance) q.set("instance", table.dataset.instance);
    const src = new EventSource("/ui/sse/events" + (q.toString() ? "?" + q : ""));
    const dot = document.getElementById("live");
    let timer = null;
    src.onopen = () => { if (dot) dot.className = "live on"; };
    src.onerror = () => { if (dot) dot.className = "live off"; };
    src.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (table) {
        const tr = document.createElement("tr");
        tr.className = "fresh";
        const words = Object.entries(ev.data || {})
          .filter(([, v]) => v != null && v !== "" && !(typeof v === "object" && !Object.keys(v).length))
          .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v));
        const cells = [ev.index, new Date(ev.ts * 1000).toISOString().slice(11, 19),
                       ev.type, ev.host || "", ev.instance || "", words.join(" ")];
        cells.forEach((v, i) => {
          const td = document.createElement("td");
          if (i === 5) { const c = document.createElement("code"); c.textContent = v; td.appendChild(c); }
          else td.textContent = v;
          tr.appendChild(td);
        });
        table.tBodies[0].insertBefore(tr, table.tBodies[0].firstChild);
        while (table.tBodies[0].rows.length > 500) table.tBodies[0].deleteRow(-1);
        const none = document.getElementById("no-events");
        if (none) none.remove();
      }
      clearTimeout(timer);
      timer = setTimeout(() => htmx.trigger(document.body, "corral:changed"), 250);
    };
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!document.body.dataset.role) return; // the login page
    let range = 3600;
    allMetricPlots(range);
    setInterval(() => allMetricPlots(range), 30000);
    document.querySelectorAll("[data-range]").forEach((b) => b.addEventListener("click", () => {
      range = Number(b.dataset.range);
      document.querySelectorAll("[data-range]").forEach((o) => o.classList.toggle("sel", o === b));
      allMetricPlots(range);
    }));
    sparks();
    syncPlot();
    document.querySelectorAll("[data-traffic]").forEach(traffic);
    document.querySelectorAll("[data-logs]").forEach(logs);
    live();
    document.body.addEventListener("htmx:afterSwap", () => { sparks(); syncPlot(); });
    document.body.addEventListener("htmx:beforeRequest", (e) => {
      // a refresh would reset the host a person is picking in a form of that part: wait
      const a = document.activeElement;
      if (e.detail.requestConfig.verb === "get" && a && a.closest("form") &&
          e.detail.elt.contains(a)) e.preventDefault();
    });
    document.body.addEventListener("htmx:beforeSwap", (e) => {
      if (e.detail.xhr.status === 401) { // the session ended: log in again, then come back
        e.detail.shouldSwap = false;
        window.location = "/login?next=" + encodeURIComponent(location.pathname);
      } else if (e.detail.xhr.status >= 400 && e.detail.target.id !== "flash") {
        e.detail.shouldSwap = false; // a refresh that failed keeps what was shown
      }
    });
  });
})();
