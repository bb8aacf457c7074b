"""The labelled evaluation progress: a bar of n/N samples on a terminal, one line at the end (only that line in a
log file), in `aqrcmt evaluate` and in the training loop's evaluation (:func:`aqrcmt.eval.predict.predict_dataset`)."""
from __future__ import annotations

import io
import sys
import time
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from aqrcmt.eval.predict import predict_dataset
from aqrcmt.structures import Detections


class _Batch(SimpleNamespace):
    def to(self, device):
        return self


class _Detector(torch.nn.Module):
    """One empty detection per sample, each batch taking longer than the bar's refresh interval (0.1 s)."""

    def predict(self, batch: _Batch) -> list[Detections]:
        time.sleep(0.15)
        return [Detections(torch.zeros(0, 9), torch.zeros(0), torch.zeros(0, dtype=torch.long)) for _ in batch.metas]


def _loader(samples: int) -> DataLoader:
    return DataLoader(list(range(samples)), batch_size=2, collate_fn=lambda metas: _Batch(metas=metas))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_file_one_line_names_what_was_evaluated_and_the_sample_count(capsys) -> None:
    predicted = predict_dataset(_Detector(), _loader(5), progress="evaluate mini_val: clean")
    assert len(predicted) == 5
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate mini_val: clean: 5/5 samples predicted in ")
    assert captured.err == ""                                         # no bar without a terminal


def test_on_a_terminal_the_bar_counts_samples_of_the_labelled_evaluation(monkeypatch, capsys) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    predict_dataset(_Detector(), _loader(5), progress="evaluate val (step_00000120)")
    bar = terminal.getvalue()
    assert "evaluate val (step_00000120): " in bar and "0/5" in bar and "2/5" in bar and "4/5" in bar
    assert "sample/s" in bar and bar.endswith("\r")                # cleared when done: the line below stays
    assert capsys.readouterr().out.startswith("evaluate val (step_00000120): 5/5 samples predicted in ")


def test_without_a_label_nothing_is_printed(capsys) -> None:
    predict_dataset(_Detector(), _loader(3))
    assert capsys.readouterr() == ("", "")
