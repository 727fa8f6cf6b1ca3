"""The loader's pacing arithmetic, on a fake clock."""

from __future__ import annotations

import pytest

from service.lifecycle.pacing import MAX_PACE_SLEEP, Pacer


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("duty, expected", [(0.5, 0.3), (0.25, 0.9), (1.0, None)])
def test_pacer_sleeps_in_proportion_to_the_work(duty, expected):
    clock = FakeClock()
    pacer = Pacer(duty, clock=clock, sleep=clock.sleep)
    clock.now += 0.3  # work
    pacer.step()
    if expected is None:
        assert clock.slept == []
    else:
        assert clock.slept == [pytest.approx(expected)]
    clock.now += 0.1
    pacer.step()  # only the work since the last step counts, not the sleep
    assert not clock.slept or clock.slept[-1] == pytest.approx(0.1 * (1 - duty) / duty)


def test_pacer_sleep_is_capped_and_duty_is_checked():
    clock = FakeClock()
    pacer = Pacer(0.1, clock=clock, sleep=clock.sleep)
    clock.now += 10
    pacer.step()
    assert clock.slept == [MAX_PACE_SLEEP]
    with pytest.raises(ValueError):
        Pacer(0)
