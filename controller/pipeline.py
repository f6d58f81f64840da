"""The path from an observation to the action sent, shared by both lanes: the server's ActStream
(one `Pipeline` per stream) and the robot's local lane (one per loop). Each tick:

1. `close`: what followed the previous action (reward, next observation, episode end) closes
   the previous step (controller.transitions), when the lane records experience;
2. `input`: the policy's input for the observation: the observation itself, or, for a policy
   with history (`mu.history`), the history this stream or loop keeps (controller/history.py),
   stepped with the action the robot applied and the new observation, and started afresh at
   each episode;
3. the lane runs the policy (`Policy.act_values`: length and NaN checks, clamp, NaN guard);
   on ActStream possibly in a micro-batch, which is why the tick is split here;
4. `output`: exploration, then the slew limit and the bounds (controller.safety), then the step
   is recorded as served.

A tick that gives no action (refused, or the lane's fallback) calls `interrupted`.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from controller.explore import Explorer
from controller.history import History
from controller.policy import ActError, Policy
from controller.safety import SlewLimiter
from controller.transitions import Outcome, Transitions, finite_vector


class Pipeline:
    """One stream's or one loop's state across ticks. Not thread-safe."""

    def __init__(self, transitions: Transitions | None = None) -> None:
        self.slew = SlewLimiter(None)
        #: None: this lane records no experience.
        self.transitions = transitions
        self._input: Sequence[float] | None = None
        # For a policy with history: the history; whether the next observation starts an
        # episode (a stream or loop opens at one); the last action sent; and the action the
        # robot reported applying instead, which the history holds in its place.
        self._history: History | None = None
        self._start = True
        self._sent: list[float] | None = None
        self._applied: Sequence[float] | None = None

    def close(self, outcome: Outcome, record: bool = True) -> bool:
        """What followed the last action (Transitions.close, unless `record` is False); True
        when a transition was kept. An episode's end makes the next observation start one."""
        if outcome.applied is not None:
            self._applied = outcome.applied
        history = self._history
        kept = False
        if record and self.transitions is not None:
            if history is not None and outcome.next_obs is not None:
                # s_{t+1} as the policy sees it: the history stepped once more.
                base = finite_vector(outcome.next_obs, history.obs_dim)
                applied = self._applied_action()
                next_obs = None if base is None or applied is None else history.peek(applied, base)
                outcome = outcome._replace(next_obs=next_obs)
            kept = self.transitions.close(outcome)
        if outcome.terminated or outcome.truncated:
            self._start = True
        return kept

    def input(
        self,
        policy: Policy,
        obs: Sequence[float],
        episode_start: bool = False,
        applied: Sequence[float] | None = None,
    ) -> Sequence[float]:
        """The policy input for `obs`. `episode_start`: `obs` starts an episode; `applied`: what
        the robot applied after the last action, when it changed it. Raises ActError."""
        if episode_start:
            self._start = True
            if self.transitions is not None:
                self.transitions.new_episode()
        if applied is not None:
            self._applied = applied
        if policy.history is None:
            self._input = obs
            return obs
        base = policy.base_observation(obs)
        history = self._history
        if history is None:  # swaps keep mu.history (controller.contract.interface_change)
            history = self._history = History.from_spec(policy.history, policy.low, policy.high)
        if self._start or self._sent is None:
            x = history.reset(base)
        else:
            previous = self._applied_action()
            if previous is None:
                raise ActError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"applied_action must be {history.act_dim} finite values",
                )
            x = history.step(previous, base)
        self._start, self._applied = False, None
        self._input = x
        return x.tolist()

    def warm_input(self, policy: Policy, obs: Sequence[float]) -> Sequence[float]:
        """An input of the right size for warming the policy's caches; changes nothing."""
        if policy.history is None:
            return obs
        return [0.0] * policy.obs_dim if self._input is None else list(self._input)

    def _applied_action(self) -> Sequence[float] | None:
        """What the robot applied after the last action: as reported, else the action sent
        (also after a fallback: `hold` applies it again); None when the report is not
        act_dim finite values."""
        if self._applied is None:
            return self._sent
        return finite_vector(self._applied, self._history.act_dim)

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
        self._sent = action
        if self.transitions is not None:
            self.transitions.served(self._input, action, version, policy.low, policy.high)
        return action

    def interrupted(self) -> None:
        if self.transitions is not None:
            self.transitions.interrupted()
