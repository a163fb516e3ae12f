"""The coordinator's round loop: send the adapter, collect, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedswarm.common.codecs import AdapterCodec, codec_for
from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import NODE_INFO_KEY, Reply, arrays_of, flag, from_record, number, to_record, whole
from fedswarm.common.errors import FedswarmError
from fedswarm.common.stop import check_stop
from fedswarm.server.coordinator.central_eval import CentralEvaluator
from fedswarm.server.coordinator.replies import Screened, reply_problem, screen_replies
from fedswarm.server.coordinator.resume import Resumed, load_resume, restore_strategy, strategy_state
from fedswarm.server.coordinator.round_plan import NodeBook, learn_from, privacy_row, round_config
from fedswarm.server.coordinator.rounds import Collected, send_and_collect
from fedswarm.server.coordinator.run_dir import SERVER_OPTIMIZER_FILE, RunDir
from fedswarm.server.coordinator.server_optimizer import ServerOptimizer
from fedswarm.server.coordinator.strategy import RESIDUAL, build_strategy, inner

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedswarm")

NODE_WAIT_SECONDS = 120.0


def run_federation(grid: Grid, cfg: FederationConfig, simulated: bool = False) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds and write the run folder; returns the summary.

    ``simulated``: the nodes are a simulation's virtual ones, sent the shared pool to partition.
    """
    started = time.perf_counter()
    resumed = load_resume(cfg.resume, cfg) if cfg.resume else None
    cfg = resumed.cfg if resumed else cfg
    if not cfg.out:
        cfg = replace(cfg, out=time.strftime("runs/run-%Y%m%d-%H%M%S"))
    run = RunDir(cfg.out)
    if not resumed and run.read_metrics():
        raise FedswarmError(f"--out {cfg.out}: already holds a run (metrics.jsonl); choose another folder")
    codec = codec_for(cfg)
    evaluator = CentralEvaluator(cfg)
    state, book, rows = _starting_point(resumed, evaluator, evaluator.initial_state(), run, cfg)
    frozen = {k: v for k, v in state.items() if not codec.trainable(k)}  # ffa's seeded A: never sent
    control = resumed.control if resumed else None  # SCAFFOLD's c (none before round 1)
    strategy = build_strategy(cfg, codec, book, frozen, NODE_WAIT_SECONDS, control)
    if resumed:
        restore_strategy(strategy, resumed.strategy_state)
    lora = inner(strategy)
    optimizer = server_optimizer(cfg, run, resumed.round if resumed else 0)
    last_round = first_round = resumed.round if resumed else 0
    for round_no in range(first_round + 1, cfg.rounds + 1):
        check_stop()
        t0 = time.perf_counter()
        config = round_config(cfg, round_no, simulated)
        arrays = to_record(codec.outgoing(state), packed=not cfg.central_dp)
        messages = list(strategy.configure_train(round_no, arrays, config, grid))  # waits, samples, personalises
        log.info("round %d/%d: training on %d clients", round_no, cfg.rounds, len(messages))
        sent = {int(m.metadata.dst_node_id): arrays_of(m.content) for m in messages}
        enough = cfg.clients_per_round if cfg.over_select > 1 else 0  # over-selected: close on the first K good
        collected = send_and_collect(
            grid,
            messages,
            cfg.round_timeout,
            _progress(round_no),
            enough,
            _trains(cfg, codec, sent) if enough else None,
        )
        screened = screen_replies(collected.replies, cfg, sent, round_no, codec)
        _require_quorum(round_no, cfg, collected, screened)
        trained, declined = learn_from(screened.accepted, book)
        train_seconds = time.perf_counter() - t0
        privacy = privacy_row(trained, declined)
        if not trained:
            log.warning(
                "round %d: no client trained (%d declined: DP budget reached); stopping", round_no, len(declined)
            )
            break
        aggregated, train_metrics = strategy.aggregate_train(round_no, trained)
        if aggregated is None:
            raise FedswarmError(f"round {round_no}: aggregation produced no adapter")
        train_metrics = MetricRecord(dict(train_metrics or {}))
        found = train_metrics.pop(RESIDUAL, None)  # Flower's own FedAvg (central DP) reports none
        residual = lora.residual(trained, aggregated) if found is None else float(found)  # type: ignore[arg-type]
        new_state = codec.complete(from_record(aggregated), state, lora.server_lr)
        if optimizer.stateful:  # FedAvgM / FedAdam / FedYogi over the tensors the nodes train
            trained_keys = {k: v for k, v in new_state.items() if codec.trainable(k)}
            new_state = {**new_state, **optimizer.step(round_no, state, trained_keys)}
        state = new_state
        control = lora.control if cfg.scaffold else None
        fed_eval = _federated_eval(grid, strategy, codec, round_no, state, config, cfg)
        result = evaluator(state) if evaluates(cfg, round_no) else None
        row = _row(
            round_no, result, train_metrics, collected, trained, time.perf_counter() - t0,
            evaluator.last_seconds if result is not None else 0.0,
        )  # fmt: skip
        row.update(train_seconds=train_seconds, aggregation_residual=residual, **privacy, **fed_eval)
        row.update(_central_privacy(strategy, cfg))
        row.update(rejected=len(screened.rejected), rejected_why=screened.rejected, failed_why=collected.failures)
        row.update(sampled=sorted(sent), late=collected.late)
        _commit(run, evaluator, state, round_no, row, cfg, book, strategy_state(strategy), control)
        if optimizer.stateful:
            run.write_control(round_no, optimizer.state_dict(), SERVER_OPTIMIZER_FILE)
        rows.append(row)
        last_round = round_no
        log.info(
            "round %d/%d done in %.1f s: train loss %.4f, %s, residual %.2e%s",
            round_no, cfg.rounds, row["seconds"], row["train_loss"], _held_out_text(row), residual,
            f", epsilon max {privacy['epsilon_max']:.3f} ({cfg.accountant})" if privacy else "",
        )  # fmt: skip
    if last_round:
        run.publish_adapter(last_round)
    constant = evaluator.constant
    run.plot_curves(constant[1] if constant else None)
    summary = _summary(cfg, rows, time.perf_counter() - started, book)
    if constant:
        summary["constant_answer"] = {"label": constant[0], "accuracy": constant[1]}
    run.write_json("summary.json", summary)
    if last_round and summary.get("privacy"):
        run.write_json("adapter/privacy.json", summary["privacy"])
    log.info("\n%s", results_table(rows, constant))
    log.info("run folder: %s (adapter/, metrics.jsonl, curves.png, summary.json)", run.root)
    return summary


def server_optimizer(cfg: FederationConfig, run: RunDir, resumed_round: int) -> ServerOptimizer:
    """``--server-optimizer`` with its moments as the resumed round left them (fresh otherwise)."""
    optimizer = ServerOptimizer(
        cfg.server_optimizer, cfg.server_lr, cfg.server_momentum, cfg.server_beta1, cfg.server_beta2, cfg.server_tau
    )
    if optimizer.stateful and resumed_round:
        saved = run.read_control(resumed_round, SERVER_OPTIMIZER_FILE)
        if saved is None:
            raise FedswarmError(
                f"--resume {run.root}: round {resumed_round} has no {SERVER_OPTIMIZER_FILE} "
                f"(was it run with --server-optimizer {cfg.server_optimizer}?)"
            )
        optimizer.load_state_dict(saved)
    return optimizer


def evaluates(cfg: FederationConfig, round_no: int) -> bool:
    """Whether round ``round_no`` (0: the base model) is scored on the held-out set: every
    ``--eval-every``-th round and the last (0: the last only)."""
    return round_no == cfg.rounds or (cfg.eval_every > 0 and round_no % cfg.eval_every == 0)


def _round_zero(evaluator: CentralEvaluator, state: dict, run: RunDir, cfg: FederationConfig) -> dict[str, Any]:
    row: dict[str, Any] = {"round": 0, "eval_loss": None, "eval_accuracy": None, "train_loss": None, "clients": 0}
    row.update(failures=0, bytes_down=0, bytes_up=0, seconds=0.0, eval_seconds=0.0)
    if evaluates(cfg, 0):
        log.info("round 0: evaluating the untouched base model on %d held-out examples", len(evaluator.holdout))
        result = evaluator(state)
        row.update(eval_loss=result.loss, eval_accuracy=result.accuracy, **_margin(result))
        row.update(seconds=evaluator.last_seconds, eval_seconds=evaluator.last_seconds)
        log.info("round 0: %s (%.1f s)", _held_out_text(row), evaluator.last_seconds)
    run.append_metrics(row)
    return row


def _starting_point(
    resumed: Resumed | None,
    evaluator: CentralEvaluator,
    initial: dict,
    run: RunDir,
    cfg: FederationConfig,
) -> tuple[dict, NodeBook, list[dict[str, Any]]]:
    """Adapter, node book and metrics rows to go on from: a resumed checkpoint, or round 0."""
    if resumed is None:
        return initial, NodeBook(), [_round_zero(evaluator, initial, run, cfg)]
    log.info("resuming %s after round %d (%d nodes in the book)", run.root, resumed.round, len(resumed.book.ranks))
    return resumed.state, resumed.book, resumed.rows


def _require_quorum(round_no: int, cfg: FederationConfig, collected: Collected, screened: Screened) -> None:
    """Fewer usable replies than ``--min-clients``: stop; the last checkpoint stays the one to resume from."""
    usable, needed = len(screened.accepted), cfg.needed_clients()
    for why in collected.failures:
        log.warning("round %d: failed: %s", round_no, why)
    if usable < needed:
        raise FedswarmError(
            f"round {round_no}: {usable} usable replies, the round needs {needed} (--min-clients); "
            f"{len(collected.failures)} failed, {len(screened.rejected)} rejected: "
            + "; ".join(collected.failures + screened.rejected)
        )


def _trains(cfg: FederationConfig, codec: AdapterCodec, sent: dict[int, dict]) -> Callable[[Message], bool]:
    """Whether a reply counts towards an over-selected round's K: it passes screening and trained (not declined)."""

    def good(reply: Message) -> bool:
        node = int(reply.metadata.src_node_id)
        if reply_problem(reply, cfg, codec, sent.get(node)) is not None:
            return False
        return not flag(reply.content["metrics"], Reply.DECLINED)

    return good


def _progress(round_no: int) -> Any:
    def report(reply: Message, done: int, total: int) -> None:
        if reply.has_error():
            log.warning("round %d: client %d/%d failed: %s", round_no, done, total, reply.error.reason)
            return
        metrics = reply.content["metrics"]
        if flag(metrics, Reply.DECLINED):
            log.warning("round %d: client %d/%d declined: %s", round_no, done, total, reply.content["privacy"]["note"])
            return
        log.info(
            "round %d: client %d/%d done (loss %.4f, %d steps, %.1f s%s)",
            round_no, done, total, metrics[Reply.TRAIN_LOSS], metrics[Reply.STEPS], metrics[Reply.SECONDS],
            f", epsilon {number(metrics, Reply.EPSILON):.3f}, {number(metrics, Reply.SAMPLE_RATE):.4f} x "
            f"{number(metrics, Reply.NOISE_MULTIPLIER):.3f}" if Reply.EPSILON in metrics else "",
        )  # fmt: skip

    return report


def _federated_eval(
    grid: Grid,
    strategy: Strategy,
    codec: AdapterCodec,
    round_no: int,
    state: dict,
    config: ConfigRecord,
    cfg: FederationConfig,
) -> dict[str, Any]:
    """``--fraction-evaluate``: the global adapter scored on the nodes' own data, through the strategy's
    ``configure_evaluate`` (FedAvg's sampling) and ``aggregate_evaluate``."""
    if cfg.fraction_evaluate <= 0:
        return {}
    arrays = to_record(codec.outgoing(state), packed=not cfg.central_dp)
    messages = list(strategy.configure_evaluate(round_no, arrays, ConfigRecord(dict(config)), grid))
    collected = send_and_collect(grid, messages, cfg.round_timeout)
    metrics = strategy.aggregate_evaluate(round_no, collected.replies)
    if metrics is None:
        return {}
    return {f"node_{k.replace('-', '_')}": v for k, v in metrics.items() if k != Reply.NUM_EXAMPLES}


def _central_privacy(strategy: Any, cfg: FederationConfig) -> dict[str, Any]:
    if not cfg.central_dp:
        return {}
    spent = strategy.privacy_spent()
    return {"central_epsilon": spent.epsilon, "central_delta": spent.delta, "central_noise": cfg.central_noise}


def _row(
    round_no: int, result: Any, train: Any, collected: Collected, trained: list[Message], seconds: float, eval_s: float
) -> dict[str, Any]:
    train = dict(train or {})
    return {
        "round": round_no,
        "eval_loss": result.loss if result is not None else None,  # None: a round --eval-every skips
        "eval_accuracy": result.accuracy if result is not None else None,
        **(_margin(result) if result is not None else {}),
        "train_loss": train.get(Reply.TRAIN_LOSS),
        "clients": len(trained),
        "failures": len(collected.failures),
        "bytes_down": collected.bytes_down,
        "bytes_up": collected.bytes_up,
        "seconds": seconds,
        "eval_seconds": eval_s,
        "client_seconds": train.get("seconds"),
        "client_peak_rss_mb": max(number(r.content["metrics"], Reply.PEAK_RSS_MB) for r in trained),
        "per_client": [_client_detail(r) for r in trained],
    }


def _client_detail(reply: Message) -> dict[str, Any]:
    metrics = reply.content["metrics"]
    detail: dict[str, Any] = {
        "node": int(reply.metadata.src_node_id),
        "examples": whole(metrics, Reply.NUM_EXAMPLES),
        "train_loss": number(metrics, Reply.TRAIN_LOSS),
        "seconds": number(metrics, Reply.SECONDS),
        "peak_rss_mb": number(metrics, Reply.PEAK_RSS_MB),
        "lora_rank": whole(metrics, Reply.LORA_RANK),
    }
    if "epsilon" in metrics:
        detail["epsilon"] = number(metrics, Reply.EPSILON)
    if NODE_INFO_KEY in reply.content:  # where the client ran: host, Ray node, device
        detail.update({k.replace("-", "_"): v for k, v in reply.content.config_records[NODE_INFO_KEY].items()})
    return detail


def _commit(
    run: RunDir, evaluator: CentralEvaluator, state: dict, round_no: int, row: dict, cfg: Any, book: NodeBook,
    strategy: dict[str, Any], control: dict[str, torch.Tensor] | None = None,
) -> None:  # fmt: skip
    """Checkpoint first, metrics line second: a metrics line always has its checkpoint."""
    from fedswarm.common.lora_state import save_adapter

    save_adapter(evaluator.model, state, run.checkpoint(round_no))  # replaces the folder: first
    if control is not None:  # SCAFFOLD's c
        run.write_control(round_no, control)
    saved = {"round": round_no, "config": asdict(cfg), "metrics": row, "nodes": book.to_json(), "strategy": strategy}
    run.write_state(round_no, saved)
    run.append_metrics(row)


def _summary(cfg: FederationConfig, rows: list[dict[str, Any]], seconds: float, book: NodeBook) -> dict[str, Any]:
    first, last = rows[0], rows[-1]
    gain = None
    if first["eval_accuracy"] is not None and last["eval_accuracy"] is not None:
        gain = last["eval_accuracy"] - first["eval_accuracy"]
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "rounds": len(rows) - 1,
        "round0": {"eval_loss": first["eval_loss"], "eval_accuracy": first["eval_accuracy"]},
        "final": {
            "eval_loss": last["eval_loss"],
            "eval_accuracy": last["eval_accuracy"],
            "eval_margin": last.get("eval_margin"),
            "eval_margin_se": last.get("eval_margin_se"),
            "eval_examples": last.get("eval_examples"),
        },
        "accuracy_gain": gain,
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "seconds": seconds,
    }
    privacy: dict[str, Any] = {}
    if "epsilon_max" in last:
        privacy["local"] = {k: last[k] for k in ("epsilon_max", "epsilon_mean", "delta", "noise_multiplier")}
        privacy["local"].update(
            max_grad_norm=last["max_grad_norm"], accountant=cfg.accountant, nodes=node_guarantees(cfg, book)
        )
    if "central_epsilon" in last:
        privacy["central"] = {"epsilon": last["central_epsilon"], "delta": last["central_delta"]}
    if privacy:
        summary["privacy"] = privacy
    return summary


def node_guarantees(cfg: FederationConfig, book: NodeBook) -> dict[str, dict[str, Any]]:
    """Per node, every figure its epsilon follows from: a reader can recompute it with any accountant.

    ``history`` lists the node's compositions, each named: ``noise_multiplier`` σ, ``sample_rate``
    q and ``steps``: that many steps of Poisson sampling at rate q (per-label rates under
    --balance-labels are at most it), each step's clipped sum (L2 bound ``max_grad_norm`` per
    example) plus Gaussian noise of std σ x bound. A node composes only the rounds it trained.
    """
    from fedswarm.common.accounting import epsilon_of

    out: dict[str, dict[str, Any]] = {}
    for node, text in sorted(book.privacy.items()):
        history = [(float(s), float(q), int(n)) for s, q, n in json.loads(text or "[]")]
        out[str(node)] = {
            "accountant": cfg.accountant,
            "delta": cfg.delta,
            "max_grad_norm": cfg.max_grad_norm,
            "history": [{"noise_multiplier": s, "sample_rate": q, "steps": n} for s, q, n in history],
            "steps": sum(n for *_, n in history),
            "epsilon": epsilon_of([list(h) for h in history], cfg.delta, cfg.accountant),
        }
    return out


def results_table(rows: list[dict[str, Any]], constant: tuple[str, float] | None = None) -> str:
    """The per-round table; with ``constant`` (label, share), each accuracy's margin over always answering it
    and the margin's standard error (binomial, on this held-out set)."""
    head, rule = "round | held-out loss | accuracy | train loss", "------+---------------+----------+-----------"
    if constant:
        head, rule = head + " | margin over constant", rule + "+---------------------"
    lines = [head, rule]
    for r in rows:
        train = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        held = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        acc = r["eval_accuracy"]
        line = f"{r['round']:>5} | {held:>13} | {'-' if held == '-' else _fmt(acc):>8} | {train:>10}"
        if constant:
            se = r.get("eval_margin_se")
            text = "-" if held == "-" else "n/a" if acc is None else f"{acc - constant[1]:+.3f}"
            text += "" if se is None or acc is None else f" ± {se:.3f}"
            line += " | " + text.rjust(20)
        lines.append(line)
    if constant:
        lines.append(f"constant answer (always {constant[0]!r}): accuracy {constant[1]:.3f}, the floor to beat")
    return "\n".join(lines)


def _margin(result: Any) -> dict[str, Any]:
    """A round's held-out size and, on labelled data, its margin over the constant answer with its standard error."""
    out: dict[str, Any] = {"eval_examples": result.examples}
    if result.margin is not None:
        out.update(eval_margin=result.margin, eval_margin_se=result.margin_se)
    return out


def _held_out_text(row: dict[str, Any]) -> str:
    if row.get("eval_loss") is None:
        return "not evaluated (--eval-every)"
    return f"held-out loss {row['eval_loss']:.4f}, accuracy {_fmt(row['eval_accuracy'])}{_margin_text(row)}"


def _margin_text(row: dict[str, Any]) -> str:
    if row.get("eval_margin") is None:
        return ""
    return f" ({row['eval_margin']:+.3f} ± {row['eval_margin_se']:.3f} over the constant answer)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
