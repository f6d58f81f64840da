"""When the fine-tuning learner may compute: between the ticks the server answers.

On a small robot computer the learner shares the machine with serving. At the lowest CPU
priority it never delays a request by running in its place, but computing *beside* a request
(the other core, the caches and memory they share) still stretches that request's tail. So the
server publishes, in memory shared with the learner process, when it expects the next
`ActStream` request: per stream, its last arrival plus its period (a running mean of the gaps
between its requests); over streams, the earliest. The learner starts a piece of work (one TD3
update, one candidate export) only when, by its own measured cost, it ends `guard_s` before
that time; until then it waits spinning, at its idle priority, which keeps its core awake
without touching memory (on this VM a learner that slept between updates cost serving more than
one that never stopped).

No stream ticking (none open, or the earliest overdue by more than `STALE_S`: the robot paused
or stopped): the learner runs freely. Where the gap a stream leaves between ticks cannot hold
the work at all (a fast loop, a lock-step simulator, a slow CPU), waiting for one would stop
learning: the work then starts right after an answer (within `ALIGN_S`), where it overlaps the
next request least. A window that should come but
does not (jitter) is waited for at most `STARVED_S`. `GetFinetuneStatus` reports the seconds
spent waiting (`learner_waited_s`) beside the updates made.
"""

from __future__ import annotations

import math
import time
from multiprocessing.context import BaseContext
from typing import Any

# A stream whose next request is this late has paused or stopped: it is not waited for.
STALE_S = 0.1
# Work that no gap can hold starts at most this long after an answer.
ALIGN_S = 0.001
# The learner runs one piece of work anyway after waiting this long for a window.
STARVED_S = 1.0
# The period estimate follows a new rate over ~10 ticks; a gap longer than this many periods
# (an episode reset, a pause) is not a period.
_EMA = 0.1
_GAP = 4.0


class TickClock:
    """The server's side: the earliest next request over the open streams, and the gap that
    stream leaves between answering one request and receiving the next, shared."""

    def __init__(self, ctx: BaseContext) -> None:
        #: [earliest expected request, that stream's gap, the last answer]: times on
        #: time.perf_counter()'s clock (CLOCK_MONOTONIC on Linux: the same in both processes);
        #: inf when no stream ticks.
        self.shared: Any = ctx.RawArray("d", 3)
        self.shared[0] = self.shared[1] = math.inf
        self._next: dict[int, tuple[float, float]] = {}

    def stream(self) -> StreamTicks:
        return StreamTicks(self)

    def _publish(self, key: int, expected: tuple[float, float] | None, now: float) -> None:
        table = self._next
        if expected is None:
            table.pop(key, None)
        else:
            table[key] = expected
        soonest = (math.inf, math.inf)
        for k, entry in list(table.items()):
            if entry[0] < now - STALE_S:
                del table[k]  # that stream stopped ticking without closing
            elif entry[0] < soonest[0]:
                soonest = entry
        self.shared[1] = soonest[1]
        self.shared[0] = soonest[0]


class StreamTicks:
    """One ActStream's requests: `arrived` when one comes in, `replied` once it is answered."""

    __slots__ = ("_clock", "_last", "_period", "_serve")

    def __init__(self, clock: TickClock) -> None:
        self._clock = clock
        self._last: float | None = None
        self._period: float | None = None
        self._serve: float | None = None

    def arrived(self, now: float) -> None:
        last, period = self._last, self._period
        if last is not None:
            gap = now - last
            if period is None:
                self._period = gap
            elif gap < _GAP * period:
                self._period = period + _EMA * (gap - period)
        self._last = now

    def replied(self, now: float) -> None:
        last, period, serve = self._last, self._period, now - self._last
        if self._serve is not None:
            serve = self._serve + _EMA * (serve - self._serve)
        self._serve = serve
        self._clock.shared[2] = now
        if period is not None:
            self._clock._publish(id(self), (last + period, period - serve), now)

    def close(self) -> None:
        self._clock._publish(id(self), None, -math.inf if self._last is None else self._last)


class Window:
    """The learner's side: waits until a piece of work of its measured cost fits before the
    next expected request."""

    def __init__(self, shared: Any, guard_s: float) -> None:
        self._shared = shared
        self.guard_s = guard_s
        #: Seconds spent waiting for windows (reported with the learner's stats).
        self.waited_s = 0.0

    def fits(self, now: float, cost_s: float) -> bool:
        """Whether work of `cost_s` started at `now` ends `guard_s` before the next expected
        request; also when no stream is ticking. Work longer than the stream's gap between ticks
        (a fast loop, a lock-step simulator, a slow CPU) starts right after an answer, where it
        overlaps the next request least."""
        expected, gap, answered = self._shared[0], self._shared[1], self._shared[2]
        need = cost_s + self.guard_s
        if now + need <= expected or now - expected > STALE_S:
            return True
        return need > gap and now - answered < ALIGN_S

    def wait(self, cost_s: float) -> None:
        """Return once work of `cost_s` fits, or after STARVED_S."""
        clock = time.perf_counter
        start = now = clock()
        while not self.fits(now, cost_s) and now - start <= STARVED_S:
            now = clock()
        self.waited_s += now - start


class Cost:
    """A running estimate of how long a piece of work takes: the larger of its mean and its last
    duration, so one slow update raises it at once and it comes back down slowly."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def measured(self, seconds: float) -> None:
        mean = self.seconds + _EMA * (seconds - self.seconds) if self.seconds else seconds
        self.seconds = max(mean, seconds)
