"""Results across seeds and tasks: medians, the GLUE average, the final table and the JSON.

A task's score is the mean of its reported metrics (MNLI: matched and mismatched accuracy;
QQP/MRPC: accuracy and F1; STS-B: Pearson and Spearman); the GLUE average is the mean of
the task scores. Every per-seed number is kept in the JSON so other averages can be made.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from mosaicbert_jax.glue.tasks import TASK_ORDER, get_task


def median_over_seeds(per_seed: dict[Any, dict[str, float]]) -> dict[str, float]:
    """Per metric, the median over seeds (NaN if any seed's value is NaN)."""
    if not per_seed:
        raise ValueError("no seed results to take a median of")
    names = list(next(iter(per_seed.values())))
    return {name: float(np.median([m[name] for m in per_seed.values()])) for name in names}


def task_score(metrics: dict[str, float]) -> float:
    return float(np.mean(list(metrics.values())))


def glue_average(task_results: dict[str, dict[str, Any]]) -> float:
    """Mean of the task scores of the tasks that ran."""
    return float(np.mean([r["score"] for r in task_results.values()]))


def _percent(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_table(task_results: dict[str, dict[str, Any]]) -> str:
    """One row per reported metric: median over seeds and each seed's value, in percent."""
    rows = [("task", "metric", "median", "seeds", "per-seed values")]
    for name in (t for t in TASK_ORDER if t in task_results):
        result = task_results[name]
        for metric, value in result["metrics"].items():
            per_seed = ", ".join(_percent(m[metric]) for m in result["per_seed"].values())
            rows.append((get_task(name).tsv_dir, metric, _percent(value),
                         str(len(result["per_seed"])), per_seed))
    average = glue_average(task_results) if task_results else float("nan")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    body = [line(rows[0]), rule] + [line(r) for r in rows[1:]] + [rule]
    body.append(f"GLUE average over {len(task_results)} task(s): {_percent(average)}")
    return "\n".join(body)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (strict JSON); numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, results: dict[str, Any]) -> None:
    """Writes results atomically (a temp file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def write_predictions(path: str, predictions: np.ndarray, labels: np.ndarray) -> None:
    """TSV of index, prediction and label per dev example (to re-check the metrics)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\tlabel\n")
        for i, (p, y) in enumerate(zip(predictions.tolist(), labels.tolist())):
            f.write(f"{i}\t{p!r}\t{y!r}\n")
