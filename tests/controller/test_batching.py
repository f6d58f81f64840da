"""Micro-batching across streams: every request gets its own answer, bad rows fail alone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.policy import ActError, load_policy, read_policy_file
from controller.robot.client import PolicyClient
from controller.service import MicroBatcher


def _policy(path: Path):
    return load_policy(read_policy_file(path), source=str(path), version=1)


def test_one_call_answers_each_row_on_its_own(policy_path: Path) -> None:
    policy = _policy(policy_path)
    good = np.random.default_rng(3).normal(0, 1, (2, 26)).astype(np.float32).tolist()
    rows = [good[0], [0.0] * 25, [float("nan")] + [0.0] * 25, good[1]]

    async def submit_all():
        batcher = MicroBatcher()
        futures = [batcher.submit(policy, row) for row in rows]  # same loop pass: one batch
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(submit_all())
    np.testing.assert_allclose(results[0], policy.act(good[0]), atol=1e-6)
    np.testing.assert_allclose(results[3], policy.act(good[1]), atol=1e-6)
    assert isinstance(results[1], ActError) and "has 25 values" in results[1].message
    assert isinstance(results[2], ActError) and "NaN" in results[2].message
    assert results[1].code == results[2].code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bug_in_a_batched_call_reaches_every_caller(policy_path: Path, monkeypatch) -> None:
    """Not a fallback and not a hang: each awaiting handler raises the error with its traceback."""
    policy = _policy(policy_path)

    def broken(rows):
        raise RuntimeError("bug inside act_rows")

    monkeypatch.setattr(policy, "act_rows", broken)

    async def submit_all():
        batcher = MicroBatcher()
        futures = [batcher.submit(policy, [0.0] * 26) for _ in range(3)]
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)

    results = asyncio.run(submit_all())
    assert [type(r) for r in results] == [RuntimeError] * 3


# Lock-step robots on a busy machine do not always land in one loop pass: repeat the rows until a
# batch of more than one has formed (bounded), so the batched path is known to have run.
MAX_PASSES = 25


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_streams_get_their_own_actions(
    server_factory, policy_path: Path, batching: bool
) -> None:
    server = server_factory(policy_path, batching=batching)
    batcher = server.server.service.batcher
    assert (batcher is not None) == batching
    session = ort.InferenceSession(str(policy_path), providers=["CPUExecutionProvider"])
    errors: list[str] = []

    def batched() -> bool:
        return batcher is None or batcher.largest_batch > 1

    def robot(seed: int) -> None:
        try:
            obs = np.random.default_rng(seed).normal(0, 2, (40, 26)).astype(np.float32)
            want = session.run(["action"], {"obs": obs})[0]
            with PolicyClient(server.target, deadline_s=5) as client:
                for _ in range(MAX_PASSES):
                    for row, expected in zip(obs, want, strict=True):
                        got = client.act(row)
                        if not np.allclose(got, expected, atol=1e-6):
                            errors.append(f"robot {seed}: {got} != {expected}")
                    if batched():
                        break
                if client.misses:
                    errors.append(f"robot {seed}: {client.misses} misses ({client.last_error})")
        except BaseException as e:  # noqa: BLE001  (a thread's failure must reach the test)
            errors.append(f"robot {seed}: {e!r}")

    threads = [threading.Thread(target=robot, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a robot thread did not finish"
    assert errors == []
    if batching:
        assert batcher.largest_batch > 1, "no batch of more than one row formed"
        assert batcher.calls > 0
