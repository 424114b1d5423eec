// The playground: plain JavaScript over the server's own endpoints (no build step, no libraries).
//   GET /v1/models -> the prompt picker (a prompt whose task records labels also gets /v1/classify scores)
//   POST /v1/completions with stream: true -> server-sent events, appended to the output as they arrive
//   GET /metrics (Prometheus text) -> a few live numbers
// Errors are shown on the page, never thrown to the console. body[data-state] is idle | running | done.
"use strict";

const $ = (id) => document.getElementById(id);
let models = []; // [{id, labels}] as GET /v1/models lists them (the base model first)
let running = null; // the AbortController of the request in flight

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function current() {
  return models.find((m) => m.id === $("model").value);
}

function onModel() {
  const m = current();
  $("labels-note").textContent = m && m.labels ? `labels: ${m.labels.join(", ")}` : "";
  $("classify").hidden = true;
}

async function loadModels() {
  const response = await fetch("v1/models");
  if (!response.ok) throw new Error(await apiError(response));
  models = (await response.json()).data;
  const select = $("model");
  const keep = select.value;
  select.replaceChildren(...models.map((m, i) => new Option(i === 0 ? `${m.id} (the base alone)` : m.id, m.id)));
  // keep the choice across reloads; else the first prompt (the base model is listed first)
  const first = models[1] || models[0];
  select.value = models.some((m) => m.id === keep) ? keep : first ? first.id : "";
  onModel();
}

// Server-sent events: "data: {json}\n\n" per event, "data: [DONE]" at the end.
async function complete(body, signal) {
  const response = await fetch("v1/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw new Error(await apiError(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const message = JSON.parse(data);
        if (message.error) throw new Error(message.error.message);
        const choice = message.choices[0];
        if (choice.text) $("output").append(choice.text);
        if (choice.finish_reason) $("finish").textContent = `(finish_reason: ${choice.finish_reason})`;
      }
    }
  }
}

async function classify(model, input, signal) {
  const response = await fetch("v1/classify", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model, input }),
    signal,
  });
  if (!response.ok) throw new Error(await apiError(response));
  const body = await response.json();
  const scores = body.labels.map((label) => body.data[0].scores[label]);
  const top = Math.max(...scores);
  const weights = scores.map((s) => Math.exp(s - top));
  const total = weights.reduce((a, b) => a + b, 0);
  const rows = body.labels.map((label, i) => {
    const tr = document.createElement("tr");
    if (label === body.data[0].label) tr.className = "best";
    const p = weights[i] / total;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(12 * p).toFixed(2)}rem`;
    for (const cell of [label, scores[i].toFixed(3), bar, `${(100 * p).toFixed(1)}%`]) {
      const td = document.createElement("td");
      td.append(cell);
      tr.append(td);
    }
    return tr;
  });
  $("scores").tBodies[0].replaceChildren(...rows);
  $("classify").hidden = false;
}

async function run(event) {
  event.preventDefault();
  const m = current();
  if (running || !m) return;
  const input = $("input").value;
  showError("");
  $("output").textContent = "";
  $("finish").textContent = "";
  $("classify").hidden = true;
  running = new AbortController();
  document.body.dataset.state = "running";
  $("run").disabled = true;
  $("stop").disabled = false;
  const body = {
    model: m.id,
    prompt: input,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
  };
  const jobs = [complete(body, running.signal)];
  if (m.labels) jobs.push(classify(m.id, input, running.signal));
  const failed = (await Promise.allSettled(jobs)).filter((r) => r.status === "rejected");
  const reasons = failed.map((r) => r.reason).filter((e) => e.name !== "AbortError");
  if (reasons.length) showError(reasons.map((e) => e.message).join("; "));
  running = null;
  $("run").disabled = false;
  $("stop").disabled = true;
  document.body.dataset.state = "done";
}

// Prometheus text: sum each name's samples over their labels.
function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (match) out.set(match[1], (out.get(match[1]) || 0) + Number(match[3]));
  }
  return out;
}

const METRICS = [
  ["HTTP requests", (m) => m.get("jaxprompt_requests_total"), 0],
  ["tokens generated", (m) => m.get("jaxprompt_generated_tokens_total"), 0],
  ["tokens/s (last batch)", (m) => m.get("jaxprompt_tokens_per_second"), 1],
  ["mean batch size", (m) => m.get("jaxprompt_batch_size_sum") / m.get("jaxprompt_batch_size_count"), 2],
  ["queue depth", (m) => m.get("jaxprompt_queue_depth"), 0],
  ["prompts served", (m) => m.get("jaxprompt_prompts"), 0],
];

async function pollMetrics() {
  let values;
  try {
    const response = await fetch("metrics");
    if (!response.ok) return;
    values = parseMetrics(await response.text());
  } catch {
    return; // the server is restarting or gone: keep the last numbers
  }
  const items = [];
  for (const [name, get, digits] of METRICS) {
    const value = get(values);
    if (value === undefined || !Number.isFinite(value)) continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = value.toFixed(digits);
    items.push(dt, dd);
  }
  $("metrics").replaceChildren(...items);
}

$("form").addEventListener("submit", run);
$("model").addEventListener("change", onModel);
$("stop").addEventListener("click", () => running && running.abort());
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
});
document.body.dataset.state = "idle";
loadModels().catch((e) => showError(`cannot list the prompts: ${e.message}`));
pollMetrics();
setInterval(pollMetrics, 2000);
