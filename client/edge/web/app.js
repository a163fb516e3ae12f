// The page's logic: transformers.js does tokenisation, the chat template and generation; this file points
// it at local files, picks a backend and a variant, bounds every wait, and shows what it runs.
// Query parameters: device=webgpu|wasm, variant=NAME; loadTimeout=S and firstTokenTimeout=S bound WebGPU (past
// them the page falls back to wasm), wasmTimeout=S bounds both on wasm (past it, nothing is left: an error);
// fallback=TEXT is the reason the page gives when it reloaded itself on wasm.
// window.fedswarm.state is the page's state (tests and benches poll it); window.fedswarm.ask(messages) answers.
import { AutoModelForCausalLM, AutoTokenizer, InterruptableStoppingCriteria, TextStreamer, env } from "./vendor/transformers.min.js";
import { backendLabel, chooseVariant, describeAdapter, oneLine, seconds } from "./choose.js";
import { readFacts, showFacts } from "./facts.js";

const here = new URL("./", location.href);
const params = new URLSearchParams(location.search);
const limits = {
  load: seconds(params.get("loadTimeout"), 180),
  firstToken: seconds(params.get("firstTokenTimeout"), 60),
  wasm: seconds(params.get("wasmTimeout"), 600),
};
const limit = (backend, kind) => (backend === "webgpu" ? limits[kind] : limits.wasm);
const state = {
  phase: "starting", // starting | loading | ready | answering | error (nothing left to fall back to)
  backend: null, // webgpu | wasm
  variant: null,
  dtype: null,
  adapter: null, // the WebGPU adapter: {vendor, architecture, description, software, shaderF16}
  choice: null, // one line: why this variant rather than the one asked for or the best
  fallback: null, // one line: why WebGPU was left for wasm
  error: null,
  loadSeconds: null,
  answers: 0,
  last: null, // {promptIds, newIds, text, seconds, firstTokenSeconds, tokensPerSecond}
  limits,
};
window.fedswarm = { state, ask };

// Never reach a hub or CDN: the model is the folder above web/, the wasm files sit in web/vendor/.
const modelUrl = new URL("../", here); // .../EDGE_DIR/
const parts = modelUrl.pathname.replace(/\/$/, "").split("/");
const modelId = parts.pop(); // transformers.js joins localModelPath + modelId + "/" + file
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = parts.join("/") + "/";
env.useBrowserCache = false;
env.backends.onnx.wasm.wasmPaths = {
  mjs: new URL("vendor/ort-wasm-simd-threaded.asyncify.mjs", here).href,
  wasm: new URL("vendor/ort-wasm-simd-threaded.asyncify.wasm", here).href,
};

const $ = (id) => document.getElementById(id);
let edge = null;
let facts = { card: null, parity: null };
let tokenizer = null;
let model = null;
let running = Promise.resolve(); // the last generation, which may outlive its time limit
const PENDING = "fedswarm.pending"; // sessionStorage: the question WebGPU failed to answer, for the reloaded page
let asked = params.get("variant"); // the variant asked for (the URL's, then the menu's); null: the page picks

/** `promise`, or a one-line error once `within` seconds have passed; `abandon` gets what arrives late. */
function bounded(promise, within, what, abandon = () => {}) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => {
      promise.then(abandon, () => {});
      reject(new Error(`${what} took longer than ${within} s`));
    }, within * 1000);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

async function probeWebGpu() {
  if (!navigator.gpu) return null;
  try {
    const adapter = await bounded(navigator.gpu.requestAdapter(), 10, "requesting a WebGPU adapter");
    if (!adapter) return null;
    const info = adapter.info ?? (await adapter.requestAdapterInfo?.());
    env.backends.onnx.webgpu.adapter = adapter; // onnxruntime runs on the adapter the page describes
    return describeAdapter(info, adapter.features);
  } catch (err) {
    console.warn(`no WebGPU adapter: ${oneLine(err)}`);
    return null;
  }
}

function render() {
  const s = state;
  const where = s.backend ? backendLabel(s.backend, s.adapter) : "";
  let text = {
    starting: "starting…",
    loading: `loading ${s.variant} (dtype ${s.dtype}) on ${where}…`,
    answering: `${where} · ${s.variant} · answering…`,
    error: `error: ${s.error}`,
  }[s.phase];
  if (s.phase === "ready") {
    text = `${where} · ${s.variant} · loaded in ${s.loadSeconds.toFixed(1)} s`;
    const last = s.last;
    if (last) {
      text += ` · last answer: ${last.newIds.length} tokens, ${last.tokensPerSecond.toFixed(1)} tokens/s`;
      text += ` (first after ${last.firstTokenSeconds.toFixed(1)} s)`;
    }
    if (s.error) text += ` · error: ${s.error}`;
  }
  $("status").textContent = text;
  $("notice").textContent = [s.fallback, s.choice].filter(Boolean).join(" · ");
  $("variant").value = s.variant ?? "";
  for (const id of ["prompt", "send", "variant"]) $(id).disabled = s.phase !== "ready";
  if (s.variant) showFacts($("card"), facts, s.variant);
}

function set(changes) {
  Object.assign(state, changes);
  render();
}

async function load(backend, wanted) {
  const { variant, note } = chooseVariant({ variants: edge.variants, fallback: edge.default, backend, asked: wanted, adapter: state.adapter });
  const dtype = edge.dtypes[variant];
  set({ phase: "loading", backend, variant, dtype, choice: note, error: null });
  const start = performance.now();
  const loading = (async () => {
    tokenizer ??= await AutoTokenizer.from_pretrained(modelId);
    return AutoModelForCausalLM.from_pretrained(modelId, { dtype, device: backend });
  })();
  const what = `loading ${variant} on ${backend}`;
  const loaded = await bounded(loading, limit(backend, "load"), what, (late) => late.dispose());
  const previous = model;
  model = loaded;
  if (previous) running.finally(() => previous.dispose()); // after an abandoned generation stops
  set({ phase: "ready", loadSeconds: (performance.now() - start) / 1000 });
}

/**
 * After `err` on WebGPU: reload the page on wasm, the reason in its URL (shown in one line) and an unanswered
 * question in sessionStorage (asked again there). A fresh page keeps nothing of the failed attempt: no GPU work
 * still running, no failed run (transformers.js queues every run behind the last: one failure fails the rest).
 * On wasm there is nothing left to fall back to: rethrow.
 */
function fallBack(err, pending = null) {
  if (state.backend !== "webgpu") throw err;
  const why = `WebGPU failed (${oneLine(err)}): running on wasm`;
  console.warn(why);
  if (pending) sessionStorage.setItem(PENDING, JSON.stringify(pending));
  const next = new URL(location.href);
  next.searchParams.set("device", "wasm");
  next.searchParams.set("fallback", why);
  if (asked) next.searchParams.set("variant", asked);
  set({ phase: "loading", fallback: why });
  location.replace(next);
  return new Promise(() => {}); // the page is going away
}

// Greedy generation through the library's own loop; the first token must come within its time limit.
async function generate(messages, maxNewTokens, onText) {
  const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
  const stopper = new InterruptableStoppingCriteria();
  let first = null;
  let firstCame;
  const firstToken = new Promise((resolve) => (firstCame = resolve));
  const streamer = new TextStreamer(tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: onText,
    token_callback_function: () => {
      first ??= performance.now();
      firstCame();
    },
  });
  const start = performance.now();
  const generation = model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer, stopping_criteria: [stopper] });
  running = generation.catch(() => {});
  const what = `the first token on ${state.backend}`;
  await bounded(Promise.race([firstToken, generation]), limit(state.backend, "firstToken"), what).catch((err) => {
    stopper.interrupt(); // an abandoned generation stops at its next step
    throw err;
  });
  const output = await generation;
  const end = performance.now();
  const promptIds = Array.from(inputs.input_ids.tolist()[0], Number);
  const newIds = Array.from(output.tolist()[0], Number).slice(promptIds.length);
  first ??= end;
  const decoding = newIds.length > 1 ? (end - first) / 1000 : (end - start) / 1000; // after the first token
  return {
    promptIds,
    newIds,
    text: tokenizer.decode(newIds, { skip_special_tokens: true }),
    seconds: (end - start) / 1000,
    firstTokenSeconds: (first - start) / 1000,
    tokensPerSecond: Math.max(newIds.length - 1, 1) / decoding,
  };
}

/** Answer `messages` (the last one shown as the user's), greedy, within the time limits; returns the reply. */
async function ask(messages, maxNewTokens = 128) {
  if (state.phase !== "ready") throw new Error(`the page is not ready (${state.phase})`);
  $("log").insertAdjacentHTML("beforeend", `<div class="user"></div><div class="assistant"></div>`);
  const out = $("log").lastElementChild;
  out.previousElementSibling.textContent = messages.at(-1).content;
  const turn = async () => {
    out.textContent = "";
    set({ phase: "answering", error: null });
    return generate(messages, maxNewTokens, (piece) => (out.textContent += piece));
  };
  try {
    const reply = await turn().catch((err) => fallBack(err, { messages, maxNewTokens }));
    out.textContent = reply.text;
    set({ phase: "ready", last: reply, answers: state.answers + 1 });
    return reply;
  } catch (err) {
    set({ phase: "ready", error: oneLine(err) }); // a failed answer on wasm leaves the page usable
    throw err;
  }
}

const history = []; // the conversation in the form; its last message is the user's while it is answered
async function converse(maxNewTokens) {
  const reply = await ask(history, maxNewTokens).catch(() => null);
  if (reply) history.push({ role: "assistant", content: reply.text });
  else history.pop();
}

$("chat").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.phase !== "ready") return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  converse();
});

$("variant").addEventListener("change", () => {
  asked = $("variant").value;
  load(state.backend, asked)
    .catch((err) => fallBack(err))
    .catch((err) => set({ phase: "error", error: oneLine(err) }));
});

try {
  [edge, facts] = await Promise.all([
    fetch(new URL("edge.json", here)).then((r) => r.json()),
    readFacts(modelUrl).catch(() => ({ card: null, parity: null })),
  ]);
  for (const v of edge.variants) $("variant").add(new Option(`${v} (${edge.dtypes[v]})`, v));
  state.fallback = params.get("fallback"); // set by fallBack, which reloaded the page here
  state.adapter = await probeWebGpu();
  const device = params.get("device") ?? (state.adapter ? "webgpu" : "wasm");
  if (device === "webgpu" && !state.adapter) {
    set({ fallback: "WebGPU failed (this browser offers no WebGPU adapter): running on wasm" });
    await load("wasm", asked);
  } else {
    await load(device, asked).catch((err) => fallBack(err));
  }
  const pending = state.fallback && sessionStorage.getItem(PENDING);
  sessionStorage.removeItem(PENDING);
  if (pending) {
    const { messages, maxNewTokens } = JSON.parse(pending);
    history.push(...messages);
    converse(maxNewTokens);
  }
} catch (err) {
  set({ phase: "error", error: oneLine(err) });
}
