"""What keep_freed_memory keeps is bounded: past KEEP_SLACK x the first step's resident size,
freed memory goes back to the OS, and a larger working set (a later crop stage) raises the
limit once instead of trimming every step."""

from __future__ import annotations

import pytest

from googlenet import devices

GB = 1 << 30


class FakeLibc:
    def __init__(self) -> None:
        self.trims = 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeLibc, list[int]]:
    libc, rss = FakeLibc(), []
    monkeypatch.setattr(devices, "_libc", lambda: libc)
    monkeypatch.setattr(devices, "resident_bytes", lambda: rss.pop(0))
    monkeypatch.setattr(devices, "_kept", {"on": 1})  # as keep_freed_memory() leaves it
    return libc, rss


def test_growth_past_the_slack_is_trimmed_and_a_larger_working_set_raises_the_limit(fake):
    libc, rss = fake
    # step 1 sets the limit (4 GB x 1.25 = 5 GB); 4.8 GB is kept; 6 GB is trimmed;
    # the step after a trim allocates afresh: 5.5 GB (a larger stage) raises the limit to 6.875
    rss += [4 * GB, int(4.8 * GB), 6 * GB, int(5.5 * GB), int(6.5 * GB), 7 * GB]
    trimmed = [devices.bound_kept_memory() for _ in range(6)]
    assert trimmed == [False, False, True, False, False, True]
    assert libc.trims == 2


def test_nothing_is_trimmed_unless_memory_is_kept(fake, monkeypatch):
    libc, rss = fake
    monkeypatch.setattr(devices, "_kept", {})
    rss += [GB, 100 * GB]
    assert not devices.bound_kept_memory() and not devices.bound_kept_memory()
    assert libc.trims == 0


def test_resident_bytes_reads_this_process():
    rss = devices.resident_bytes()
    assert 10 << 20 < rss < 64 * GB  # torch is loaded: tens of MB at least
