"""The one restart backoff (workers and isolated backends), driven by an injected clock."""

from __future__ import annotations

from tensorgate.backoff import RestartBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_deaths_in_a_row_double_the_delay_up_to_the_cap() -> None:
    clock = Clock()
    backoff = RestartBackoff(initial=0.5, maximum=30.0, stable_after=60.0, clock=clock)
    delays = []
    for _ in range(9):
        backoff.started()
        clock.now += 1.0  # dies after a second
        delays.append(backoff.delay())
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_stable_run_starts_again_from_the_first_delay() -> None:
    clock = Clock()
    backoff = RestartBackoff(initial=0.5, maximum=30.0, stable_after=60.0, clock=clock)
    for _ in range(4):
        backoff.started()
        clock.now += 1.0
        backoff.delay()
    backoff.started()
    clock.now += 59.9  # not quite stable
    assert backoff.delay() == 8.0
    backoff.started()
    clock.now += 60.0
    assert backoff.delay() == 0.5
    backoff.started()
    clock.now += 1.0
    assert backoff.delay() == 1.0


def test_failed_starts_count_as_deaths() -> None:
    backoff = RestartBackoff(clock=Clock())
    assert [backoff.delay() for _ in range(3)] == [0.5, 1.0, 2.0]
