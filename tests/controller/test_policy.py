"""Loading and validating policy files, and the clamp / NaN guards, without a server."""

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.policy import (
    ActError,
    PolicyLoadError,
    PolicyReadError,
    load_policy,
    read_policy_file,
)


def _load(path: Path):
    return load_policy(read_policy_file(path), source=str(path), version=1)


def test_actions_equal_onnxruntime(policy_path: Path) -> None:
    policy = _load(policy_path)
    session = ort.InferenceSession(str(policy_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    obs = rng.normal(0, 2, (20, policy.obs_dim)).astype(np.float32)
    (expected,) = session.run(["action"], {"obs": obs})
    for row, want in zip(obs, expected, strict=True):
        np.testing.assert_allclose(policy.act(row.tolist()), want, atol=1e-6)
    np.testing.assert_allclose(
        policy.act_batch(obs.ravel().tolist(), len(obs)), expected, atol=1e-6
    )


def test_metadata_is_read(policy_path: Path) -> None:
    policy = _load(policy_path)
    assert (policy.env_id, policy.obs_dim, policy.act_dim) == ("TestEnv-v0", 26, 6)
    assert policy.obs_layout == [("observation", 20), ("goal", 6)]
    assert policy.low.tolist() == [-1.0, -2.0, -0.5, -1.0, 0.0, -3.0]


def test_actions_are_clamped_to_metadata_bounds(make_policy) -> None:
    # The graph scales to [-1, 1]x6 but the metadata says tighter bounds: the server clamps.
    path = make_policy("wide.onnx", low=[-1.0] * 6, high=[1.0] * 6)
    policy = _load(path)
    policy.low = np.full(6, -0.01, np.float32)
    policy.high = np.full(6, 0.01, np.float32)
    rng = np.random.default_rng(2)
    for _ in range(20):
        action = policy.act(rng.normal(0, 3, policy.obs_dim).tolist())
        assert np.all(action >= -0.01) and np.all(action <= 0.01)


@pytest.mark.parametrize(
    ("obs", "message"),
    [
        ([0.0] * 25, "observation has 25 values; the policy expects 26"),
        ([], "observation is empty; the policy expects 26 values"),
        ([0.0] * 3 + [float("nan")] + [0.0] * 22, "NaN or infinite values at indices [3]"),
        ([float("inf")] + [0.0] * 25, "NaN or infinite values at indices [0]"),
    ],
)
def test_bad_observations_are_refused(policy_path: Path, obs, message: str) -> None:
    with pytest.raises(ActError) as refused:
        _load(policy_path).act(obs)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.message


def test_nan_from_the_model_is_refused(nan_policy: Path) -> None:
    policy = _load(nan_policy)
    assert np.isfinite(policy.act([0.0] * 26)).all()
    with pytest.raises(ActError) as refused:
        policy.act([101.0] + [0.0] * 25)
    assert refused.value.code == grpc.StatusCode.INTERNAL
    assert "NaN" in refused.value.message


def test_corrupt_file_is_refused(corrupt_policy: Path) -> None:
    with pytest.raises(PolicyLoadError, match="not a loadable ONNX model"):
        _load(corrupt_policy)


def test_metadata_disagreeing_with_graph_is_refused(wrong_metadata_policy: Path) -> None:
    with pytest.raises(PolicyLoadError, match="mu.obs_dim"):
        _load(wrong_metadata_policy)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"mu.format": "other.v9"}, "mu.format"),
        ({"mu.action_low": "[1, 1, 1, 1, 1, 1]"}, "below action_high"),
        ({"mu.action_high": "[1, 1, 1]"}, "shape"),
        ({"mu.action_high": '[1, 1, 1, 1, 1, "Infinity"]'}, "JSON list of numbers|finite"),
        ({"mu.obs_layout": '[["obs", 5]]'}, "obs_layout"),
        ({"mu.act_dim": "six"}, "not an integer"),
    ],
)
def test_bad_metadata_is_refused(make_policy, metadata: dict, match: str) -> None:
    with pytest.raises(PolicyLoadError, match=match):
        _load(make_policy("bad.onnx", metadata=metadata))


def test_missing_file_is_a_read_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyReadError, match="cannot read policy file"):
        read_policy_file(tmp_path / "nope.onnx")
