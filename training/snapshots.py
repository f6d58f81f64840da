"""Evaluated actors and the choice of the exported one.

A snapshot is an evaluated actor: its deterministic evaluation, the step, which actor it was
(`current`, or TD7's `checkpoint`) and copies of the weights it acts through. The trainer keeps
the best snapshot over every evaluation of every actor (where the ranges widen, from when they
are full: `Run._consider`); `choose_export` picks what policy.onnx holds from it and the last
actor."""

from __future__ import annotations

from typing import Any

from training.algos import AnyAgent, actor_weights


def snapshot(
    view: AnyAgent, evaluated: str, step: int, mean_return: float, success_rate: float | None
) -> dict[str, Any]:
    return {
        "eval_return": mean_return,
        "eval_success_rate": success_rate,
        "step": step,
        "evaluated": evaluated,
        "weights": actor_weights(view),
    }


def upgrade(best: dict[str, Any] | None) -> dict[str, Any] | None:
    """A best snapshot from a checkpoint written before snapshots named their actor (TD3's,
    with the actor and normalizer weights at the top level)."""
    if best is None or "weights" in best:
        return best
    weights = {"actor": best.pop("actor"), "normalizer": best.pop("normalizer")}
    return {**best, "evaluated": "current", "weights": weights}


def choose_export(
    rule: str, best: dict[str, Any] | None, last: dict[str, Any], meta: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the snapshot policy.onnx holds, its metadata). With rule "last", the last actor; with
    "best", the best evaluated snapshot (any actor, any evaluation) where it returned more than
    the last actor, the last actor otherwise. The metadata is `meta` plus the evaluation that
    chose it."""
    pick = (
        last
        if rule == "last" or best is None or best["eval_return"] <= last["eval_return"]
        else best
    )
    chosen = {
        **meta,
        "eval_return": pick["eval_return"],
        "eval_success_rate": pick["eval_success_rate"],
        "eval_actor": pick["evaluated"],
        "export_rule": rule,
    }
    if pick is not last:
        chosen["eval_step"] = pick["step"]
    return pick, chosen
