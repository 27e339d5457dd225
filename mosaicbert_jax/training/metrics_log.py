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


METRICS_FILE = "metrics.jsonl"


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the JSON-lines file at `path` without the records past `step` (those a killed
    run logged after its last checkpoint, which the resumed run logs again); returns how many
    were dropped. Atomic: a temp file beside it is renamed over it."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                dropped += 1
                continue
            if record_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        temp = f"{path}.tmp.{os.getpid()}"
        with open(temp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    return dropped


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet:
    tensorboardX imports torch only to accept torch tensors, which we never pass (floats
    only), and that import alone took 2.5-4 s of every training start where torch is
    installed. sys.modules[name] = None makes `import torch` raise ImportError, the case
    tensorboardX handles; the entry is removed again, so later imports of torch work."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """Writes each record to the console, TensorBoard and a JSON-lines file.

    `resume_step`: the step a run resumes from; the file's records past it are dropped first
    (-1, as for a run that starts from scratch in a used workdir, drops every record)."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        if resume_step is not None:
            drop_rows_after(path, resume_step)
        self._jsonl = open(path, "a")
        try:
            self.writer = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
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
