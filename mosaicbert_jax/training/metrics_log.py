"""Where training metrics go: console lines, TensorBoard events, metrics.jsonl (process 0 only)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsLog:
    """Writes each record to the console, TensorBoard and a JSON-lines file."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard output is optional
            print("tensorboardX not installed: no TensorBoard events", file=sys.stderr)

    def write(self, kind: str, step: int, values: Mapping[str, float],
              console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time()}
        record.update({k: float(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", float(value), int(step))
        if console:
            print(console, flush=True)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self.writer is not None:
            self.writer.close()
