// The model card's facts beside the chat: where the model came from (README.md's front matter, written
// by the export from the run's summary) and how the running variant compares to PyTorch (parity.json).

/** {card, parity}: the card's facts (null if the card has none) and parity.json (null if absent). */
export async function readFacts(modelUrl) {
  const [readme, parity] = await Promise.all([
    fetch(new URL("README.md", modelUrl)).then((r) => (r.ok ? r.text() : "")),
    fetch(new URL("parity.json", modelUrl)).then((r) => (r.ok ? r.json() : null)),
  ]);
  // Front matter: "---" lines around YAML; the export writes the facts as one JSON line, "fedswarm: {...}".
  const front = readme.startsWith("---\n") ? readme.slice(4, readme.indexOf("\n---", 4)) : "";
  const line = front.split("\n").find((l) => l.startsWith("fedswarm: "));
  return { card: line ? JSON.parse(line.slice("fedswarm: ".length)) : null, parity };
}

const count = (n, what) => `${n ?? "?"} ${what}${n === 1 ? "" : "s"}`;
const num = (x) => (typeof x === "number" ? String(Number(x.toPrecision(4))) : String(x ?? "?"));

/** Rows of [term, description] for the panel. */
export function factRows({ card, parity }, variant) {
  if (!card) return [["Model card", "no facts in this export's README.md (exported before they were written)"]];
  const rows = [["Base model", card.base_model]];
  if (!card.adapter) {
    rows.push(["Adapter", "none: the base model as it is"]);
  } else {
    const run = card.run;
    const how = run ? `${count(run.rounds, "round")}, ${count(run.clients, "client")} on ${run.data ?? "?"}` : "run unknown";
    rows.push(["Adapter", `${card.adapter}, merged (${how})`]);
  }
  const p = card.privacy;
  rows.push([
    "Privacy",
    p ? `(ε = ${num(p.epsilon)}, δ = ${num(p.delta)})-DP${p.kind ? `, ${p.kind}` : ""}` : "no differential-privacy guarantee recorded",
  ]);
  const v = parity?.variants?.[variant];
  if (v) {
    rows.push([
      `${variant} against PyTorch`,
      `next-token agreement ${v.next_token_agreement.toFixed(4)}, max logit error ${num(v.max_logit_error)}, ` +
        `perplexity ${v.perplexity_change >= 0 ? "+" : ""}${(v.perplexity_change * 100).toFixed(2)}%, ` +
        `${(v.size_bytes / 1e6).toFixed(1)} MB (${num(v.size_vs_fp32)} × fp32); ${parity.texts} held-out texts`,
    ]);
  }
  return rows;
}

/** Fill the <dl> with the rows. */
export function showFacts(dl, facts, variant) {
  dl.replaceChildren();
  for (const [term, text] of factRows(facts, variant)) {
    dl.append(Object.assign(document.createElement("dt"), { textContent: term }));
    dl.append(Object.assign(document.createElement("dd"), { textContent: text }));
  }
}
