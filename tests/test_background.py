"""Helper threads: prefetching an iterator keeps its order, its errors, and stops when closed early."""

from __future__ import annotations

import threading
import time

import pytest

from softtargets.background import ahead, prefetched


def test_prefetched_keeps_order_and_takes_items_on_one_helper_thread():
    takers = []

    def numbers():
        for i in range(50):
            takers.append(threading.current_thread().name)
            yield i

    assert list(prefetched(numbers(), depth=3, name="pf-test")) == list(range(50))
    assert set(takers) == {"pf-test"}


def test_prefetched_runs_at_most_depth_items_ahead():
    taken = []

    def numbers():
        for i in range(100):
            taken.append(i)
            yield i

    it = prefetched(numbers(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)  # time for the helper to run ahead as far as it may
    assert len(taken) <= 1 + 2  # the item handed out and two more
    it.close()


def test_prefetched_raises_the_iterators_error_at_its_place():
    def failing():
        yield 1
        yield 2
        raise KeyError("third item")

    got = []
    with pytest.raises(KeyError, match="third item"):
        for x in prefetched(failing()):
            got.append(x)
    assert got == [1, 2]


def test_closing_prefetched_early_stops_the_helper():
    taken = []

    def endless():
        i = 0
        while True:
            taken.append(i)
            yield i
            i += 1

    before = threading.active_count()
    it = prefetched(endless(), depth=4)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # joins the helper
    assert threading.active_count() == before
    stopped_at = len(taken)
    time.sleep(0.1)
    assert len(taken) == stopped_at <= 3 + 4 + 1


def test_ahead_pairs_items_with_results_in_order():
    assert list(ahead([3, 1, 2], lambda x: x * 10)) == [(3, 30), (1, 10), (2, 20)]
    assert list(ahead([], lambda x: x)) == []
