"""Where experience goes on the server (torch-free, on the event loop): a trusted ActStream's
transitions (assembled by controller.transitions, as on the local lane) become float32 rows
(controller.contract.row_width) sent to the learner in chunks; a full queue drops the chunk and
counts it, never waits. An untrusted stream's reports are counted as rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from controller.contract import fill_row, to_unit
from controller.transitions import Transition

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What happened to reported experience (shared by all streams of one server)."""

    received: int = 0  # transitions assembled
    rejected: int = 0  # reports that could not form a transition (bad length, non-finite, ...)
    dropped: int = 0  # transitions lost because the learner's queue was full
    sent: int = 0  # transitions handed to the queue


class TransitionSink:
    """Collects rows into chunks of `chunk_size` and hands each full chunk to `put_nowait`,
    which returns False when the queue is full (the chunk is then dropped and counted)."""

    def __init__(
        self,
        width: int,
        chunk_size: int,
        put_nowait: Callable[[np.ndarray], bool],
        counters: Counters,
    ) -> None:
        self._chunk = np.empty((chunk_size, width), np.float32)
        self._n = 0
        self._put = put_nowait
        self.counters = counters

    def add(self, row: np.ndarray) -> None:
        self._chunk[self._n] = row
        self._n += 1
        self.counters.received += 1
        if self._n == len(self._chunk):
            self.flush()

    def flush(self) -> None:
        if self._n == 0:
            return
        chunk, n = self._chunk[: self._n].copy(), self._n
        self._n = 0
        if self._put(chunk):
            self.counters.sent += n
        else:
            self.counters.dropped += n


class LearnerSink:
    """Where a trusted ActStream's transitions (controller.transitions) go: rows for the learner,
    and episode returns for the rollback monitor (`on_episode(version, episode_return)`)."""

    def __init__(
        self, sink: TransitionSink, on_episode: Callable[[int, float], None], width: int
    ) -> None:
        self._sink = sink
        self._on_episode = on_episode
        self._row = np.empty(width, np.float32)

    def put(self, t: Transition) -> bool:
        fill_row(self._row, t.obs, to_unit(t.action, t.low, t.high), t.reward, t.next_obs,
                 t.terminated, t.truncated)  # fmt: skip
        self._sink.add(self._row)
        return True

    def reject(self) -> None:
        self._sink.counters.rejected += 1

    def episode(self, version: int, episode_return: float) -> None:
        self._on_episode(version, episode_return)


class UntrustedExperience:
    """Where an ActStream whose caller lacks the admin token reports: counted as rejected and
    logged once, never learned from nor judged by."""

    def __init__(self, counters: Counters, peer: str) -> None:
        self._counters = counters
        self._peer = peer
        self._warned = False

    def put(self, t: Transition) -> bool:
        self.reject()
        return False

    def reject(self) -> None:
        self._counters.rejected += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "ActStream from %s reports experience without the admin token; ignored",
                self._peer,
            )

    def episode(self, version: int, episode_return: float) -> None:
        pass
