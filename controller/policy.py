"""Load, validate and run one ONNX policy file (docs/contract.md, the policy file).

Serving needs onnxruntime and numpy only: metadata is read through onnxruntime, never `onnx`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from controller import contract as c
from controller.contract import FORMAT_TAG, INPUT_NAME, ORT_ERRORS, OUTPUT_NAME, REQUIRED_KEYS
from controller.decoding import clipped
from controller.errors import UsageError
from controller.onnxfile import NonFinite, check_finite

log = logging.getLogger(__name__)


# Observations run through a policy before it is served (controller.policy._probe).
PROBE_ROWS = 8
# The most observations of a batch in one onnxruntime call (Policy.act_batch).
BATCH_CHUNK = 1024


class PolicyLoadError(UsageError):
    """The file is not a usable mu policy; the message says why."""


class PolicyReadError(PolicyLoadError):
    """The file cannot be read at all (missing, permissions)."""


class ActError(Exception):
    """A request the policy refuses; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def session_options() -> ort.SessionOptions:
    """onnxruntime tuned for one small request at a time: no thread pools, full graph fusion."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; load problems are reported by PolicyLoadError
    return options


@dataclass
class Policy:
    """A validated policy ready to serve. `act` is not thread-safe: it reuses bound buffers, which
    is safe because the server runs every request on one event loop thread."""

    version: int
    source: str
    sha256: str
    session: ort.InferenceSession
    env_id: str
    obs_dim: int
    act_dim: int
    low: np.ndarray
    high: np.ndarray
    obs_layout: list[tuple[str, int]]
    metadata: dict[str, str]
    loaded_at: float = field(default_factory=time.time)
    #: `mu.history` ({"obs": H, "actions": K, "obs_dim": D}); None when the input is one
    #: observation. With one, ActStream and the local lane build the input (controller.pipeline).
    history: dict[str, int] | None = None
    #: The ONNX file itself: WatchPolicy ships it to local-lane loops.
    onnx: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        # One observation in a pre-bound input buffer, the action in a pre-bound output buffer:
        # about half the per-call cost of session.run with fresh arrays.
        self._obs = np.zeros((1, self.obs_dim), np.float32)
        self._action = np.zeros((1, self.act_dim), np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(INPUT_NAME, self._obs)
        self._binding.bind_output(
            OUTPUT_NAME, "cpu", 0, np.float32, [1, self.act_dim], self._action.ctypes.data
        )

    def act(self, obs: Sequence[float]) -> np.ndarray:
        """One observation (any float sequence) -> the clamped action, shape (act_dim,).

        Raises ActError: INVALID_ARGUMENT for a wrong length or non-finite values, INTERNAL when
        the model outputs NaN (it never leaves the server).
        """
        return np.asarray(self.act_values(obs), np.float32)

    def act_values(self, obs: Sequence[float]) -> list[float]:
        """`act` as a list of floats (float32 values): what a reply message takes, at least cost.

        Between two requests the server's caches go cold (measured in `mu serve`: two numpy
        ufuncs for the clamp took 12 µs there against 0.7 µs back to back), so the small
        vectors are handled in plain Python, which the gRPC code keeps warm anyway.
        """
        self._obs[0] = self._checked(obs, self.obs_dim)
        self.session.run_with_iobinding(self._binding)
        # Comparisons with NaN are false, so a NaN passes the clamp and the check below sees it.
        action = [
            high if v > high else low if v < low else v
            for v, low, high in zip(
                self._action[0].tolist(), self.low.tolist(), self.high.tolist(), strict=True
            )
        ]
        total = sum(action)
        if total != total:
            raise ActError(grpc.StatusCode.INTERNAL, self._nan_message())
        return action

    def base_observation(self, obs: Sequence[float]) -> list[float]:
        """One observation for a policy with history (mu.history's obs_dim values), checked like
        `act_values` checks an input; the pipeline builds the input from it."""
        return self._checked(obs, self.history["obs_dim"])

    def _checked(self, obs: Sequence[float], expected: int) -> list[float]:
        # The length first (len of a repeated field costs nothing): a refused request of a
        # million values must not be copied. Then one C-level copy of the repeated field:
        # iterating it twice (sum, then numpy) costs ~3 µs more.
        n = len(obs)
        if n != expected:
            raise self._length_error(n, expected)
        obs = list(obs)
        # A Python float sum is exact enough to detect NaN/inf (float32 values cannot overflow a
        # double sum) and cheaper than numpy for a few dozen values.
        total = sum(obs)
        if total - total != 0.0:
            raise _non_finite_error(np.asarray(obs, np.float32))
        return obs

    def stateless_hint(self, width: int) -> str:
        """Why an input of `width` values per row is refused by a stateless call (Act, ActBatch,
        ModelInfer) when it is one observation of a policy with history; "" otherwise."""
        if self.history is None or width != self.history["obs_dim"]:
            return ""
        return (
            f" (one observation: this policy reads its recent past ({c.HISTORY}), which a "
            "stateless call cannot keep; use ActStream or the local lane, which build the "
            f"history, or send the whole input of {self.obs_dim} values, docs/contract.md)"
        )

    def act_rows(self, rows: Sequence[Sequence[float]]) -> list[np.ndarray | ActError]:
        """Several independent observations in one onnxruntime call (the server's micro-batch).

        Each row gets its own answer: a clamped action, or the ActError `act` would raise for it
        alone, so one bad request never fails the others.
        """
        out: list[np.ndarray | ActError] = []
        good: list[Sequence[float]] = []
        for obs in rows:
            n = len(obs)
            total = sum(obs) if n == self.obs_dim else 0.0
            if n != self.obs_dim:
                out.append(self._length_error(n, self.obs_dim))
            elif total - total != 0.0:
                out.append(_non_finite_error(np.asarray(obs, np.float32)))
            else:
                out.append(self._action[0])  # placeholder, replaced below
                good.append(obs)
        if not good:
            return out
        (actions,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(good, np.float32)})
        actions = np.minimum(np.maximum(actions, self.low), self.high)
        nan = np.isnan(actions).any(axis=1)
        k = 0
        for i, item in enumerate(out):
            if isinstance(item, ActError):
                continue
            out[i] = (
                ActError(grpc.StatusCode.INTERNAL, self._nan_message()) if nan[k] else actions[k]
            )
            k += 1
        return out

    def act_batch(self, obs: Sequence[float], batch_size: int) -> np.ndarray:
        """batch_size observations, row after row -> clamped actions (batch_size, act_dim)."""
        if batch_size <= 0:
            raise ActError(grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be at least 1")
        n = len(obs)
        if n != batch_size * self.obs_dim:
            raise ActError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch has {n} values; {batch_size} observations of {self.obs_dim} need "
                f"{batch_size * self.obs_dim}{self.stateless_hint(n // batch_size)}",
            )
        x = np.asarray(obs, np.float32).reshape(batch_size, self.obs_dim)
        if not np.isfinite(x).all():
            rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ActError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"observations {_first(rows)} contain NaN or infinite values",
            )
        # In chunks: onnxruntime's memory arena grows to the largest call it has seen and never
        # shrinks (one 4 MB batch in one call left a server 360 MB larger).
        actions = np.concatenate(
            [
                self.session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + BATCH_CHUNK]})[0]
                for i in range(0, batch_size, BATCH_CHUNK)
            ]
        )
        actions = np.minimum(np.maximum(actions, self.low), self.high)
        bad = np.isnan(actions).any(axis=1)
        if bad.any():
            raise ActError(grpc.StatusCode.INTERNAL, self._nan_message(np.flatnonzero(bad)))
        return actions

    def _length_error(self, n: int, expected: int) -> ActError:
        if n == 0:
            msg = f"observation is empty; the policy expects {expected} values"
        else:
            msg = f"observation has {n} values; the policy expects {expected}"
        if expected == self.obs_dim:
            msg += self.stateless_hint(n)
        return ActError(grpc.StatusCode.INVALID_ARGUMENT, msg)

    def _nan_message(self, rows: np.ndarray | None = None) -> str:
        where = "" if rows is None else f" for observations {_first(rows)}"
        return f"policy version {self.version} produced a NaN action{where}; request refused"


def _first(indices: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def _non_finite_error(x: np.ndarray) -> ActError:
    where = np.flatnonzero(~np.isfinite(x))
    return ActError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"observation has NaN or infinite values at indices {_first(where)}",
    )


def read_policy_file(path: str | Path) -> bytes:
    """The file's bytes; PolicyReadError (with the path) when it cannot be read, PolicyLoadError
    when it is not a regular file: reading a FIFO would block every later load until a writer
    came, a device might never end."""
    shown = clipped(str(path))
    try:
        # O_NONBLOCK: a FIFO opens without waiting for a writer (a regular file ignores it).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise PolicyReadError(f"cannot read policy file {shown}: {e.strerror or e}") from e
    except ValueError as e:  # a NUL byte in the path
        raise PolicyLoadError(f"policy path {shown!r} is not a valid path: {e}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PolicyLoadError(f"policy path {shown} is not a regular file; not read")
        try:
            return f.read()
        except OSError as e:
            raise PolicyReadError(f"cannot read policy file {shown}: {e.strerror or e}") from e


def load_policy(data: bytes, *, source: str, version: int) -> Policy:
    """Build an onnxruntime session from the file's bytes and check it against the contract.

    Raises PolicyLoadError naming the first problem found.
    """
    try:
        session = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    except ORT_ERRORS as e:
        raise PolicyLoadError(f"{source} is not a loadable ONNX model: {_short(e)}") from e
    try:
        check_finite(data)
    except NonFinite as e:
        raise PolicyLoadError(f"{source}: {e}; refusing to serve it") from None
    try:
        meta = dict(session.get_modelmeta().custom_metadata_map)
    except UnicodeDecodeError as e:
        raise PolicyLoadError(f"{source} has metadata that is not valid UTF-8: {e}") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise PolicyLoadError(f"{source} lacks metadata {', '.join(missing)}; export it with mu")
    if meta[c.FORMAT] != FORMAT_TAG:
        raise PolicyLoadError(
            f"{source} has {c.FORMAT} {clipped(meta[c.FORMAT])!r}; this server reads {FORMAT_TAG!r}"
        )
    obs_dim = _positive_int(meta, c.OBS_DIM, source)
    act_dim = _positive_int(meta, c.ACT_DIM, source)
    low = _bounds(meta, c.ACTION_LOW, act_dim, source)
    high = _bounds(meta, c.ACTION_HIGH, act_dim, source)
    if not (low < high).all():
        raise PolicyLoadError(f"{source}: action_low must be below action_high in every dimension")
    history = _history(meta, obs_dim, act_dim, source)
    # With history, the layout cuts one observation, not the whole input.
    layout = _layout(meta, obs_dim if history is None else history["obs_dim"], source)
    _check_signature(session, obs_dim, act_dim, source)
    policy = Policy(
        version=version,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        session=session,
        env_id=meta[c.ENV_ID],
        obs_dim=obs_dim,
        act_dim=act_dim,
        low=low,
        high=high,
        obs_layout=layout,
        metadata=meta,
        history=history,
        onnx=data,
    )
    _probe(policy, source)
    return policy


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def _positive_int(meta: dict[str, str], key: str, source: str) -> int:
    try:
        value = int(meta[key])
    except ValueError:
        raise PolicyLoadError(f"{source}: {key} is {meta[key]!r}, not an integer") from None
    if value <= 0:
        raise PolicyLoadError(f"{source}: {key} must be positive, got {value}")
    return value


def _bounds(meta: dict[str, str], key: str, act_dim: int, source: str) -> np.ndarray:
    try:
        values = np.asarray(json.loads(meta[key]), dtype=np.float32)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise PolicyLoadError(f"{source}: {key} is not a JSON list of numbers") from None
    if values.shape != (act_dim,):
        raise PolicyLoadError(f"{source}: {key} has shape {values.shape}; act_dim is {act_dim}")
    if not np.isfinite(values).all():
        raise PolicyLoadError(f"{source}: {key} must be finite")
    return values


def _layout(meta: dict[str, str], size: int, source: str) -> list[tuple[str, int]]:
    try:
        layout = [(str(name), int(size)) for name, size in json.loads(meta[c.OBS_LAYOUT])]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise PolicyLoadError(
            f"{source}: mu.obs_layout is not a JSON list of [name, size]"
        ) from None
    if sum(n for _, n in layout) != size:
        raise PolicyLoadError(f"{source}: mu.obs_layout sizes do not add up to {size}")
    return layout


def _history(
    meta: dict[str, str], obs_dim: int, act_dim: int, source: str
) -> dict[str, int] | None:
    try:
        spec = c.history_spec(meta)
    except (ValueError, TypeError) as e:
        raise PolicyLoadError(f"{source}: {e}") from None
    if spec is None:
        return None
    if spec["obs_dim"] * (1 + spec["obs"]) + act_dim * spec["actions"] != obs_dim:
        raise PolicyLoadError(
            f"{source}: {c.HISTORY} {spec} does not add up to {c.OBS_DIM} {obs_dim}"
        )
    return spec


def _check_signature(
    session: ort.InferenceSession, obs_dim: int, act_dim: int, source: str
) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise PolicyLoadError(
            f"{source} has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in outputs]}; expected one input {INPUT_NAME!r} and output "
            f"{OUTPUT_NAME!r}"
        )
    output = next(o for o in outputs if o.name == OUTPUT_NAME)
    for arg, dim, what in ((inputs[0], obs_dim, c.OBS_DIM), (output, act_dim, c.ACT_DIM)):
        if arg.type != "tensor(float)":
            raise PolicyLoadError(f"{source}: {arg.name!r} is {arg.type}; expected tensor(float)")
        shape = arg.shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != dim):
            raise PolicyLoadError(
                f"{source}: {arg.name!r} has shape {shape}; {what} says [batch, {dim}]"
            )
        if isinstance(shape[0], int) and shape[0] != 1:
            raise PolicyLoadError(f"{source}: {arg.name!r} needs a dynamic batch axis, has {shape}")


def _probe(policy: Policy, source: str) -> None:
    """Run probe observations through both code paths before serving: the zero observation
    alone, then a batch of it and seeded normal draws. Their unclamped actions must be finite
    (the clamp would hide an infinite one) and must not all be equal inside the bounds: a
    policy whose action ignores the observation is broken (an infinite parameter, which
    saturates a layer the same way, is refused before, by `check_finite`)."""
    rows = np.random.default_rng(0).normal(0.0, 1.0, (PROBE_ROWS, policy.obs_dim))
    rows[0] = 0.0
    try:
        single = policy.act([0.0] * policy.obs_dim)
        batch = policy.act_batch(rows.ravel().tolist(), PROBE_ROWS)
        (raw,) = policy.session.run([OUTPUT_NAME], {INPUT_NAME: rows.astype(np.float32)})
    except ActError as e:
        raise PolicyLoadError(f"{source} fails the probe inference: {e.message}") from None
    except ORT_ERRORS as e:
        raise PolicyLoadError(f"{source} fails the probe inference: {_short(e)}") from e
    if single.shape != (policy.act_dim,) or batch.shape != (PROBE_ROWS, policy.act_dim):
        raise PolicyLoadError(
            f"{source}: probe produced actions of shape {batch.shape}; "
            f"expected ({PROBE_ROWS}, {policy.act_dim})"
        )
    if not np.isfinite(raw).all():
        raise PolicyLoadError(f"{source} outputs infinite actions on probe observations")
    if (raw == raw[0]).all():
        # Saturated on every probe (tanh at ±1: the action at its bounds) is what a young or
        # aggressive policy does on arbitrary probes, and says nothing of real observations;
        # a constant inside the bounds is an actor that ignores its input.
        if np.all(np.isclose(raw[0], policy.low) | np.isclose(raw[0], policy.high)):
            log.warning(
                "%s gives the same action, at its bounds, for %d probe observations (saturated "
                "there); serving it", source, PROBE_ROWS,
            )  # fmt: skip
        else:
            raise PolicyLoadError(
                f"{source} outputs the same action for {PROBE_ROWS} different probe "
                "observations: its action does not depend on the observation"
            )
    log.debug("probe ok for %s: %s", source, single)
