"""Progress of long loops (building an image store, meta-training, validation, the test): tqdm's bar on a terminal;
elsewhere (output to a file, as under Slurm, nohup or CI) plain lines a person can read.

A redirected tqdm bar writes a carriage-return frame at every refresh: a 12-minute training wrote 2,181 of them,
219 KB, into one log line (#37). `progress_bar` writes, when stderr is not a terminal, one line at most every
`LINE_INTERVAL` seconds (and the last one), each with the tasks (or images, episodes) done, the rate, the elapsed
time and the ETA, and the postfix (loss, accuracy) the loop last set.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

LINE_INTERVAL = 30.0  # seconds between two plain progress lines
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, elapsed {elapsed}, ETA {remaining}{postfix}"


class Lines:
    """A file for tqdm that turns its carriage-return frames into whole lines, at most one every `interval` seconds
    (the frame before tqdm's closing newline always)."""

    def __init__(self, stream: IO[str], interval: float = LINE_INTERVAL):
        self.stream, self.interval, self.last, self.pending = stream, interval, -float("inf"), ""

    def write(self, text: str) -> None:
        frame = text.replace("\r", "").replace("\x1b[A", "").strip()
        if frame:
            self.pending = frame
            if time.monotonic() - self.last >= self.interval:
                self.emit()
        elif "\n" in text and self.pending:  # tqdm closes: its final frame, then a newline
            self.emit()

    def emit(self) -> None:
        self.stream.write(self.pending + "\n")
        self.stream.flush()
        self.last, self.pending = time.monotonic(), ""

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, interval: float = LINE_INTERVAL, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; plain lines (`Lines`) at most every `interval` seconds otherwise."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty() or kwargs.get("disable"):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs.update(bar_format=LINE_FORMAT, mininterval=min(interval, kwargs.get("mininterval", 5.0)), ascii=True)
    return tqdm(iterable, file=Lines(stream, interval), **kwargs)
