// The page's logic: transformers.js does tokenisation, the chat template and generation;
// this file only points it at local files, picks a device and shows the conversation.
import { AutoModelForCausalLM, AutoTokenizer, TextStreamer, env } from "./vendor/transformers.min.js";

const here = new URL("./", location.href);
const edge = await (await fetch(new URL("edge.json", here))).json();
const params = new URLSearchParams(location.search);

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

const state = { device: null, dtype: null, variant: null, error: null, ready: false };
window.fedswarm = { state };

async function pickDevice() {
  const wanted = params.get("device");
  if (wanted) return wanted;
  try {
    if (navigator.gpu && (await navigator.gpu.requestAdapter())) return "webgpu";
  } catch (_) {
    /* no usable adapter: fall through to wasm */
  }
  return "wasm";
}

let model = null;
let tokenizer = null;

async function load(variant) {
  state.ready = false;
  const dtype = edge.dtypes[variant];
  const device = await pickDevice();
  setStatus(`loading ${variant} (dtype ${dtype}) on ${device}…`);
  tokenizer ??= await AutoTokenizer.from_pretrained(modelId);
  let used = device;
  try {
    model = await AutoModelForCausalLM.from_pretrained(modelId, { dtype, device });
  } catch (err) {
    if (device !== "webgpu" || params.get("device")) throw err;
    console.warn(`WebGPU failed (${err?.message ?? err}); falling back to wasm`);
    used = "wasm";
    model = await AutoModelForCausalLM.from_pretrained(modelId, { dtype, device: used });
  }
  Object.assign(state, { device: used, dtype, variant, ready: true, error: null });
  setStatus(`${variant} on ${used}`);
}

// Greedy generation through the library's own loop; returns the prompt and new token ids.
async function generate(messages, maxNewTokens = 64, onText = null) {
  const inputs = tokenizer.apply_chat_template(messages, { add_generation_prompt: true, return_dict: true });
  const streamer = onText ? new TextStreamer(tokenizer, { skip_prompt: true, skip_special_tokens: true, callback_function: onText }) : undefined;
  const output = await model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false, streamer });
  const promptIds = Array.from(inputs.input_ids.tolist()[0], Number);
  const allIds = Array.from(output.tolist()[0], Number);
  const newIds = allIds.slice(promptIds.length);
  return { promptIds, newIds, text: tokenizer.decode(newIds, { skip_special_tokens: true }) };
}
window.fedswarm.generate = generate;

const history = [];
const log = document.getElementById("log");
function setStatus(text) {
  document.getElementById("status").textContent = text;
}

document.getElementById("chat").addEventListener("submit", async (event) => {
  event.preventDefault();
  const box = document.getElementById("prompt");
  const text = box.value.trim();
  if (!text || !state.ready) return;
  box.value = "";
  history.push({ role: "user", content: text });
  log.insertAdjacentHTML("beforeend", `<div class="user"></div><div class="assistant"></div>`);
  log.lastElementChild.previousElementSibling.textContent = text;
  const out = log.lastElementChild;
  const reply = await generate(history, 128, (piece) => (out.textContent += piece));
  out.textContent = reply.text;
  history.push({ role: "assistant", content: reply.text });
});

const select = document.getElementById("variant");
for (const v of edge.variants) select.add(new Option(`${v} (${edge.dtypes[v]})`, v));
select.value = params.get("variant") ?? edge.default;
select.addEventListener("change", () => load(select.value).catch(fail));

function fail(err) {
  state.error = String(err?.message ?? err);
  setStatus(`error: ${state.error}`);
  throw err;
}

window.fedswarm.ready = load(select.value).then(() => {
  for (const id of ["prompt", "send"]) document.getElementById(id).disabled = false;
  return state;
}, fail);
