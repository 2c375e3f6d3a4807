"""Saved runs: the time to reach an accuracy, read from a run's per-epoch history."""

from __future__ import annotations

from vitcnn.results import time_to_accuracy

HISTORY = [{"epoch": "1", "val_acc": "0.5", "epoch_time_s": "10.0"}, {"epoch": "2", "val_acc": "0.82", "epoch_time_s": "12.5"},
           {"epoch": "3", "val_acc": "0.81", "epoch_time_s": "11.0"}, {"epoch": "4", "val_acc": "0.86", "epoch_time_s": "9.0"}]


def test_time_to_accuracy_is_the_first_epoch_at_the_target_and_the_time_until_then():
    reached = time_to_accuracy(HISTORY, [0.8, 0.85, 0.9])
    assert reached[0.8] == {"epoch": 2, "seconds": 22.5, "val_acc": 0.82}
    assert reached[0.85] == {"epoch": 4, "seconds": 42.5, "val_acc": 0.86}  # a later dip does not count against it
    assert reached[0.9] is None
