"""Progress bars redraw rarely: in Jupyter each redraw is an IOPub message, and a long cell that sends
thousands of them loses messages under nbval ("Timeout of 5 seconds exceeded waiting for output")."""
import io
import time

import torch
from tqdm.std import tqdm as std_tqdm

import mergelib.utils as mutils
from mergelib.data import TaskData
from mergelib.models import MLP
from mergelib.training import train_classifier


class CountingTqdm(std_tqdm):
    displays = 0

    def __init__(self, *args, **kwargs):
        kwargs["file"] = io.StringIO()
        super().__init__(*args, **kwargs)

    def display(self, *args, **kwargs):
        CountingTqdm.displays += 1
        return super().display(*args, **kwargs)


def test_training_bar_redraws_at_most_every_mininterval(monkeypatch):
    monkeypatch.setattr(mutils, "tqdm", CountingTqdm)
    monkeypatch.setattr(mutils, "PROGRESS_MININTERVAL", 0.2)
    CountingTqdm.displays = 0
    g = torch.Generator().manual_seed(0)
    data = TaskData("toy", "train", torch.randint(0, 256, (256, 1, 4, 4), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (256,), generator=g), ("a", "b", "c"))
    torch.manual_seed(0)
    model = MLP(16, (8,), 3)
    t0 = time.perf_counter()
    hist = train_classifier(model, data, steps=300, batch_size=32, progress=True)
    elapsed = time.perf_counter() - t0
    assert len(hist["loss"]) == 50                         # the loss is still logged 50 times
    # opening + closing draw, plus at most one redraw per mininterval (the postfix does not force one)
    assert CountingTqdm.displays >= 2                      # the bar was drawn
    assert CountingTqdm.displays <= 3 + elapsed / 0.2, (CountingTqdm.displays, elapsed)


def test_progress_bar_keeps_explicit_settings():
    assert mutils.progress_bar(range(3), mininterval=0.0, file=io.StringIO()).mininterval == 0.0
    assert mutils.progress_bar(range(3), file=io.StringIO()).mininterval == mutils.PROGRESS_MININTERVAL
