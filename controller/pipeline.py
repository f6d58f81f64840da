"""The path from an observation to the action sent, shared by both lanes: the server's ActStream
(one `Pipeline` per stream) and the robot's local lane (one per loop). Each tick:

1. `close`: what followed the previous action (reward, next observation, episode end) closes
   the previous step (controller.transitions), when the lane records experience;
2. `input`: the policy's input for the observation;
3. the lane runs the policy (`Policy.act_values`: length and NaN checks, clamp, NaN guard);
   on ActStream possibly in a micro-batch, which is why the tick is split here;
4. `output`: exploration, then the slew limit and the bounds (controller.safety), then the step
   is recorded as served.

A tick that gives no action (refused, or the lane's fallback) calls `interrupted`.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.explore import Explorer
from controller.policy import Policy
from controller.safety import SlewLimiter
from controller.transitions import Outcome, Transitions


class Pipeline:
    """One stream's or one loop's state across ticks. Not thread-safe."""

    def __init__(self, transitions: Transitions | None = None) -> None:
        self.slew = SlewLimiter(None)
        #: None: this lane records no experience.
        self.transitions = transitions
        self._input: Sequence[float] | None = None

    def close(self, outcome: Outcome) -> bool:
        """What followed the last action (Transitions.close); True when a transition was kept."""
        if self.transitions is None:
            return False
        return self.transitions.close(outcome)

    def input(self, policy: Policy, obs: Sequence[float]) -> Sequence[float]:
        """The policy input for `obs`."""
        self._input = obs
        return obs

    def output(
        self,
        policy: Policy,
        version: int,
        action: list[float],
        explorer: Explorer | None,
        max_delta: float | None,
    ) -> list[float]:
        """The action to send for the policy's `action`: explored (when `explorer` is given),
        slew-limited against the previous one and clamped; recorded as served."""
        if explorer is not None:
            action = explorer.perturb(action, policy.low, policy.high).tolist()
        slew = self.slew
        slew.max_delta = max_delta
        action = slew.limit(action, policy.low, policy.high)
        if self.transitions is not None:
            self.transitions.served(self._input, action, version, policy.low, policy.high)
        return action

    def interrupted(self) -> None:
        if self.transitions is not None:
            self.transitions.interrupted()
