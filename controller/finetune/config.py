"""FinetuneConfig: every setting of online fine-tuning, documented and validated (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from controller.errors import UsageError


def check_algo(algo: str, source: object) -> None:
    """Online fine-tuning runs the TD3 update (td3 and ddpg agents). A td7 agent is refused: its
    SALE encoders, prioritized replay and checkpoint rule are not part of the learner."""
    if algo == "td7":
        raise UsageError(
            f"{source} was trained with td7; online fine-tuning supports td3 and ddpg agents "
            "only (the learner runs the TD3 update, without TD7's encoders, LAP replay and "
            "checkpoints). Serve the policy without --finetune, or fine-tune a td3 run "
            "(docs/finetuning.md)"
        )


@dataclass
class FinetuneConfig:
    """How the server learns from reported experience and when it may swap policies."""

    #: The training checkpoint (agent.pt / checkpoint.pt from `mu train`): actor, critics,
    #: targets and normalizer. Its replay buffer, when it has one, seeds the online buffer.
    checkpoint: Path
    #: Where every version is kept (candidates, agent snapshots, the `current.json` pointer).
    #: None = a `versions` directory next to the checkpoint.
    versions_dir: Path | None = None
    #: Std of the Gaussian perturbation of ActStream actions, in [-1, 1] units (scaled to the
    #: bounds, then clamped to them). 0 = no exploration (the default).
    explore_std: float = 0.0
    #: Largest perturbation, in [-1, 1] units: the noise is clipped to ±explore_clip.
    explore_clip: float = 0.3
    #: Transition chunks the queue to the learner holds; when full, new chunks are dropped
    #: (and counted) instead of blocking the event loop.
    queue_chunks: int = 256
    #: Transitions per chunk sent to the learner (a partial chunk is flushed every 50 ms).
    chunk_size: int = 32
    #: Capacity of the learner's replay buffer (transitions).
    buffer_size: int = 100_000
    #: Adam learning rates for fine-tuning: lower than training's, so one bad batch moves little.
    actor_lr: float = 2e-5
    critic_lr: float = 3e-4
    #: Transitions per TD3 update.
    batch_size: int = 128
    #: Online transitions the critic must have seen before the actor is updated at all: the
    #: critic first adapts to the new dynamics, then the actor follows its slope.
    actor_warmup: int = 1000
    #: Most TD3 updates per received transition (update-to-data ratio), so a fast CPU does not
    #: overfit a small buffer; the learner idles once it has used its share. High enough by
    #: default that a robot-class core stays busy: on 2 cores at 100 Hz a learner capped at 1
    #: (idling half the time) put serving p99 at 2.6-3.0x, a busy one at 1.1-1.2x
    #: (docs/finetuning.md).
    updates_per_transition: float = 4.0
    #: Actor updates between two candidate exports: the learner's budget on the serving side.
    #: A promotion costs the server a policy load and the gates, which hold its GIL and a CPU
    #: for milliseconds; at 50 (a promotion a second on 2 cores) ActStream p99 rose 1.3-1.5x
    #: at 100 Hz, at 200 it rose 1.07-1.09x and the gap was recovered as fast
    #: (docs/finetuning.md). With lr 1e-4 and 250, every candidate moved too far and was refused.
    candidate_every: int = 200
    #: Gate: largest |candidate - current| action over recent states, as a fraction of the
    #: action range (high - low), per dimension.
    gate_max_change: float = 0.5
    #: Gate: mean |candidate - current| action over recent states and dimensions, same units.
    gate_mean_change: float = 0.1
    #: Gate: recent served observations the candidate is compared on (at least this many needed).
    gate_states: int = 256
    #: Episodes (reported over ActStream, wholly under one version) that judge a version; a new
    #: candidate is promoted only once the current version has this many.
    rollback_window: int = 10
    #: Roll back when the new version's mean return < previous mean - margin, with
    #: margin = rollback_margin * |previous mean| + rollback_margin_abs.
    rollback_margin: float = 0.2
    rollback_margin_abs: float = 0.0
    #: Start with updates paused (resume with the ResumeFinetuning RPC).
    start_paused: bool = False
    #: Seed of the learner's sampling and of the exploration noise.
    seed: int = 0
    #: The learner runs at SCHED_IDLE, pinned to one CPU, so serving always preempts it.
    #: Test-only: False keeps it at normal priority, so that a test on a saturated machine
    #: still sees updates within its deadline. Never turn it off on a serving machine.
    learner_idle_priority: bool = True

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        if self.versions_dir is None:
            self.versions_dir = self.checkpoint.parent / "versions"
        self.versions_dir = Path(self.versions_dir)
        checks = {
            f"checkpoint {self.checkpoint} is not a file": self.checkpoint.is_file(),
            "explore_std must be in [0, 1]": 0 <= self.explore_std <= 1,
            "explore_clip must be in (0, 2]": 0 < self.explore_clip <= 2,
            "queue_chunks and chunk_size must be >= 1": min(self.queue_chunks, self.chunk_size)
            >= 1,
            "batch_size must be >= 1 and <= buffer_size": 1 <= self.batch_size <= self.buffer_size,
            "learning rates must be > 0": self.actor_lr > 0 and self.critic_lr > 0,
            "actor_warmup must be >= 0": self.actor_warmup >= 0,
            "updates_per_transition must be > 0": math.isfinite(self.updates_per_transition)
            and self.updates_per_transition > 0,
            "candidate_every must be >= 1": self.candidate_every >= 1,
            "gate_max_change and gate_mean_change must be > 0": min(
                self.gate_max_change, self.gate_mean_change
            )
            > 0,
            "gate_states must be >= 1": self.gate_states >= 1,
            "rollback_window must be >= 1": self.rollback_window >= 1,
            "rollback margins must be >= 0": min(self.rollback_margin, self.rollback_margin_abs)
            >= 0,
            "learner_idle_priority must be true or false": isinstance(
                self.learner_idle_priority, bool
            ),
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise UsageError("invalid FinetuneConfig: " + "; ".join(failed))
