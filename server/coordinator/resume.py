"""Resuming a run from its last completed round: adapter, round counter, nodes, strategy state.

A round is complete when its line is in ``metrics.jsonl``: the coordinator writes the
checkpoint (``checkpoints/round-NNN/``: PEFT adapter + ``state.json``) before that line,
so a line always has its checkpoint, and a checkpoint without a line (a crash between
the two) is redone. So is a round whose line a crash cut short: that torn last line is
dropped from ``metrics.jsonl`` (a warning says so); a bad line before the last is an error.
The resumed run keeps the saved settings; only the operational ones below may change, and
a changed setting of any other kind is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.config import FederationConfig
from fedswarm.common.errors import FedswarmError
from fedswarm.server.coordinator.round_plan import NodeBook
from fedswarm.server.coordinator.run_dir import CONTROL_FILE, RunDir

if TYPE_CHECKING:
    import torch

# Settings a resumed run may change: how long it runs and how it treats nodes, not what it learns.
OPERATIONAL = ("rounds", "round_timeout", "min_clients", "max_update_norm", "device", "fraction_evaluate")
IGNORED = ("resume", "out", "resume_given")


@dataclass
class Resumed:
    round: int  # the last completed round; the run goes on with round + 1
    cfg: FederationConfig
    state: dict[str, torch.Tensor]  # the global adapter after that round
    book: NodeBook
    strategy_state: dict[str, Any]
    control: dict[str, torch.Tensor] | None  # SCAFFOLD's c after that round (--scaffold runs)
    rows: list[dict[str, Any]]  # metrics.jsonl rows up to that round, round 0 included


def load_resume(folder: str, requested: FederationConfig) -> Resumed:
    """Read the run folder's last completed round; ``requested`` may change only OPERATIONAL settings."""
    if not (Path(folder) / "metrics.jsonl").is_file():
        raise FedswarmError(f"--resume {folder}: not a run folder (no metrics.jsonl)")
    run = RunDir(folder)
    rows = run.repair_metrics()
    done = [r for r in rows if r.get("round", 0) >= 1]
    if not done:
        raise FedswarmError(f"--resume {folder}: no completed round in metrics.jsonl to resume from")
    last = int(done[-1]["round"])
    checkpoint = run.checkpoint(last)
    try:
        saved = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise FedswarmError(f"--resume {folder}: round {last} has no readable checkpoint state ({exc})") from None
    cfg = merge_config(saved["config"], requested, folder)
    return Resumed(
        round=last,
        cfg=cfg,
        state=_load_adapter(checkpoint / "adapter_model.safetensors", folder),
        book=NodeBook.from_json(saved.get("nodes", {})),
        strategy_state=dict(saved.get("strategy", {})),
        control=_load_control(run, last, folder) if cfg.scaffold else None,
        rows=[r for r in rows if r.get("round", 0) <= last],
    )


def merge_config(saved: dict[str, Any], requested: FederationConfig, folder: str) -> FederationConfig:
    """The saved settings, with the operational ones the resume asks for.

    Asked for: those in ``requested.resume_given`` (the CLI lists what was typed, so asking for
    a default value works); without that list, those not at their default.
    """
    defaults = FederationConfig()
    known = {f.name for f in fields(FederationConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    typed = {name.strip().replace("-", "_") for name in requested.resume_given.split(",")} - {""}
    for f in fields(FederationConfig):
        asked, default = getattr(requested, f.name), getattr(defaults, f.name)
        wanted = f.name in typed if typed else asked != default
        if f.name in IGNORED or not wanted or asked == merged.get(f.name, default):
            continue
        if f.name not in OPERATIONAL:
            flag = "--" + f.name.replace("_", "-")
            raise FedswarmError(
                f"--resume {folder}: {flag} {asked!r} differs from the run's {merged.get(f.name)!r}; "
                f"a resumed run may change only {', '.join('--' + n.replace('_', '-') for n in OPERATIONAL)}"
            )
        merged[f.name] = asked
    merged.update(out=folder, resume=folder, resume_given=requested.resume_given)
    try:
        return dataclasses.replace(defaults, **merged)
    except (TypeError, ValueError) as exc:
        raise FedswarmError(f"--resume {folder}: saved settings are not valid here: {exc}") from None


def restore_strategy(strategy: Any, saved: dict[str, Any]) -> None:
    """Central DP: the accountant's releases so far (so epsilon keeps accumulating)."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and "central_accountant" in saved:
        accountant.load_state_dict(saved["central_accountant"])


def strategy_state(strategy: Any) -> dict[str, Any]:
    """What ``restore_strategy`` needs; saved in each round's ``state.json``."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is None or not hasattr(accountant, "state_dict"):
        return {}
    return {"central_accountant": accountant.state_dict()}


def _load_control(run: RunDir, round_no: int, folder: str) -> dict[str, torch.Tensor]:
    try:
        control = run.read_control(round_no)
    except (OSError, RuntimeError) as exc:
        raise FedswarmError(f"--resume {folder}: cannot read round {round_no}'s SCAFFOLD control ({exc})") from None
    if control is None:
        raise FedswarmError(f"--resume {folder}: round {round_no} has no SCAFFOLD control ({CONTROL_FILE})")
    return control


def _load_adapter(path: Path, folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (OSError, RuntimeError) as exc:
        raise FedswarmError(f"--resume {folder}: cannot read the checkpoint adapter {path.name} ({exc})") from None
