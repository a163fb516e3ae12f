"""The run folder: metrics.jsonl, per-round checkpoints, the final adapter, summary, curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.errors import FedswarmError
from fedswarm.common.paths import atomic_dir, atomic_write_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedswarm")

CONTROL_FILE = "control.safetensors"  # SCAFFOLD's c in a checkpoint (not part of the PEFT adapter)
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"  # --server-optimizer's moments (not part of the adapter)


class RunDir:
    """Everything a run commits to disk; each write is atomic, so a crash loses nothing written."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def checkpoint(self, round_no: int) -> Path:
        return self.root / "checkpoints" / f"round-{round_no:03d}"

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(row)) + "\n")
            handle.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl``; a line that is not a JSON object is a one-line error naming it."""
        rows, _, torn = self._parse_metrics(self._metrics_text())
        if torn is not None:
            raise FedswarmError(
                f"{self.metrics_path}: the last line is torn (a write cut short); --resume drops it, or remove it"
            )
        return rows

    def repair_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` after dropping a torn last line (a crash mid-write), rewritten atomically.

        Only the last line may be torn: the coordinator appends one line per round, so a crash
        cuts at most the line it was writing. A bad line before it is an error, as in ``read_metrics``.
        """
        text = self._metrics_text()
        rows, complete, torn = self._parse_metrics(text)
        if torn is not None:
            log.warning("%s: dropped a torn last line (%d characters: %.40r...)", self.metrics_path, len(torn), torn)
        if complete != text:
            atomic_write_text(self.metrics_path, complete)  # also ends a whole last line that lost its newline
        return rows

    def _metrics_text(self) -> str:
        if not self.metrics_path.exists():
            return ""
        return self.metrics_path.read_text(encoding="utf-8", errors="replace")

    def _parse_metrics(self, text: str) -> tuple[list[dict[str, Any]], str, str | None]:
        """Rows, the text of their lines (each ending in a newline), and the last line if it is torn, else None."""
        lines = text.split("\n")
        filled = [number for number, line in enumerate(lines, 1) if line.strip()]
        rows: list[dict[str, Any]] = []
        kept: list[str] = []
        for number in filled:
            line = lines[number - 1]
            row = _row(line)
            if row is None and number == filled[-1]:
                return rows, "".join(kept), line
            if row is None:
                raise FedswarmError(
                    f"{self.metrics_path}: line {number} is not a JSON object; only a torn last line can be dropped"
                )
            rows.append(row)
            kept.append(line + "\n")
        return rows, "".join(kept), None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.root / name, json.dumps(_clean(data), indent=2) + "\n")

    def write_state(self, round_no: int, state: dict[str, Any]) -> None:
        """Round counter and strategy state beside the round's adapter checkpoint."""
        atomic_write_text(self.checkpoint(round_no) / "state.json", json.dumps(_clean(state), indent=2))

    def write_control(self, round_no: int, control: dict[str, torch.Tensor], name: str = CONTROL_FILE) -> None:
        """SCAFFOLD's ``c`` (or, by ``name``, other coordinator state) after the round, beside its
        adapter checkpoint (atomic)."""
        from safetensors.torch import save_file

        path = self.checkpoint(round_no) / name
        tmp = path.with_name(f".{name}.tmp")
        save_file({k: v.contiguous() for k, v in control.items()}, str(tmp))
        tmp.replace(path)

    def read_control(self, round_no: int, name: str = CONTROL_FILE) -> dict[str, torch.Tensor] | None:
        """The round's SCAFFOLD ``c`` (or the file ``name``), or None when the round kept none."""
        from safetensors.torch import load_file

        path = self.checkpoint(round_no) / name
        return load_file(str(path)) if path.is_file() else None

    def publish_adapter(self, round_no: int) -> None:
        """Copy the round's checkpoint to ``adapter/`` (final, PEFT format)."""
        import shutil

        with atomic_dir(self.root / "adapter") as tmp:
            for item in self.checkpoint(round_no).iterdir():
                if item.name not in ("state.json", CONTROL_FILE, SERVER_OPTIMIZER_FILE):
                    shutil.copy2(item, tmp / item.name)

    def plot_curves(self, constant: float | None = None) -> None:
        """``curves.png``: held-out loss and accuracy per round (round 0 = base model).

        ``constant``: the accuracy of always giving the commonest label, drawn as the floor.
        """
        import matplotlib.pyplot as plt

        fig = curves_figure(self.read_metrics(), constant)
        tmp = self.root / ".curves.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        tmp.replace(self.root / "curves.png")


def curves_figure(rows: list[dict[str, Any]], constant: float | None = None) -> Any:
    """The loss and accuracy panels (integer round ticks; the constant answer as a dotted floor, the last
    round's margin over it with its standard error, which the accuracy's error bars show per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)  # one round axis for both
    held = [(r["round"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]  # --eval-every skips some
    if held:
        ax_loss.plot(*zip(*held, strict=True), "o-", label="held-out")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train, strict=True), "s--", label="train (clients)")
    ax_loss.set(xlabel="round", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    acc = [
        (r["round"], r["eval_accuracy"], r.get("eval_margin_se")) for r in rows if r.get("eval_accuracy") is not None
    ]  # noqa: E501
    if acc:
        errors = [se if se is not None else 0.0 for *_, se in acc]  # the margin's standard error, as an error bar
        ax_acc.errorbar([a[0] for a in acc], [a[1] for a in acc], yerr=errors, fmt="o-", capsize=3, label="held-out")
        last = next((r for r in reversed(rows) if r.get("eval_margin") is not None), None)
        if last is not None:
            ax_acc.annotate(
                f"{last['eval_margin']:+.3f} ± {last['eval_margin_se']:.3f}\nover the constant answer\n"
                f"({last.get('eval_examples', '?')} held-out)",
                (last["round"], last["eval_accuracy"]), textcoords="offset points", xytext=(-10, -40), ha="right",
                fontsize=8,
            )  # fmt: skip
    if constant is not None:
        ax_acc.axhline(constant, color="grey", linestyle=":", label=f"constant answer ({constant:.3f})")
        ax_acc.legend()
    ax_acc.set(xlabel="round", ylabel="accuracy", title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _row(line: str) -> dict[str, Any] | None:
    """One metrics line as a row, or None if it is not a whole JSON object."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
