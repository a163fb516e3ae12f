// The page's decisions, kept free of the browser and the runtime so they can be tested on their own:
// what the WebGPU adapter is, which backend and variant to run, and the one-line texts that say so.

// Adapters that run WebGPU on the CPU (Chromium's SwiftShader, Mesa's llvmpipe/lavapipe, Windows' WARP).
const SOFTWARE = /swiftshader|llvmpipe|lavapipe|warp|software/i;

/** {vendor, architecture, description, software, shaderF16} of a GPUAdapter's info and features. */
export function describeAdapter(info, features) {
  const vendor = info?.vendor || "";
  const architecture = info?.architecture || "";
  const description = info?.description || "";
  const software = Boolean(info?.isFallbackAdapter) || SOFTWARE.test(`${vendor} ${architecture} ${description}`);
  return { vendor, architecture, description, software, shaderF16: Boolean(features?.has("shader-f16")) };
}

/** "WebGPU (software adapter: google swiftshader)", "WebGPU (nvidia ampere)" or "wasm (CPU)". */
export function backendLabel(backend, adapter) {
  if (backend !== "webgpu") return "wasm (CPU)";
  const name = [adapter?.vendor, adapter?.architecture].filter(Boolean).join(" ") || "unnamed adapter";
  return `WebGPU (${adapter?.software ? "software adapter: " : ""}${name})`;
}

/**
 * The variant to run on `backend`: the one asked for (honoured even where the backend may refuse it:
 * the fallback then says why), else q4f16 on WebGPU with shader-f16, else the export's default.
 * Returns {variant, note}; note is one line saying why the page chose otherwise than asked or than best.
 */
export function chooseVariant({ variants, fallback, backend, asked, adapter }) {
  if (asked && variants.includes(asked)) return { variant: asked, note: null };
  const prefix = asked ? `no ${asked} in this export (${variants.join(", ")}); ` : "";
  if (backend === "webgpu" && variants.includes("q4f16")) {
    if (adapter?.shaderF16) return { variant: "q4f16", note: prefix ? `${prefix}running q4f16` : null };
    const variant = variants.includes("q4") ? "q4" : fallback;
    return { variant, note: `${prefix}q4f16 needs shader-f16, which this adapter lacks: running ${variant}` };
  }
  return { variant: fallback, note: prefix ? `${prefix}running ${fallback}` : null };
}

/** Seconds from a query parameter: a positive number, else the default. */
export function seconds(value, fallback) {
  const number = Number(value);
  return value !== null && value !== undefined && Number.isFinite(number) && number > 0 ? number : fallback;
}

/**
 * One line for an error or a time limit, whatever was thrown; of onnxruntime's long run errors
 * ("failed to call OrtRun(). ... Status Message: shader_helper.cc:416 GenerateSourceCode Program Gather
 * requires f16 but ...") just the cause ("Program Gather requires f16 but ...").
 */
export function oneLine(err) {
  let text = String(err?.message ?? err).split("\n")[0].trim();
  const cause = text.lastIndexOf("Status Message: ");
  if (cause >= 0) text = text.slice(cause + "Status Message: ".length).replace(/^\S+\.(cc|h):\d+ \S+ /, "");
  return text.replace(/\.$/, "").slice(0, 300);
}
