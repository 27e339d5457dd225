"""The 8 GLUE tasks of the spec: where their data lives, how labels read, which metrics count.

Label ids follow tensorflow-datasets / HuggingFace `glue`, so TSV and TFDS data agree.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# The order results are printed in (the spec's order).
TASK_ORDER = ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte")

@dataclasses.dataclass(frozen=True)
class Split:
    """One evaluation (or training) split: its TSV file stem, TFDS split and result prefix."""

    tsv_stem: str          # "dev" -> dev.tsv
    tfds_split: str        # "validation"
    metric_prefix: str     # "" or "matched_" (MNLI reports matched and mismatched)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """What a GLUE task needs to be read, trained and scored."""

    name: str                           # tfds config name, e.g. "sst2"
    tsv_dir: str                        # folder in the official GLUE layout, e.g. "SST-2"
    text_columns: tuple[str, ...]       # TSV header names of the one or two texts
    label_column: str                   # TSV header name of the label
    tfds_text_features: tuple[str, ...]
    label_names: Optional[tuple[str, ...]]  # None: regression (a float score)
    metrics: tuple[str, ...]            # metric names of metrics.METRIC_FUNCTIONS
    eval_splits: tuple[Split, ...] = (Split("dev", "validation", ""),)
    # CoLA's TSVs have no header: column positions (text, label) are used instead.
    headerless_columns: Optional[tuple[int, int]] = None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def result_names(self) -> list[str]:
        """Names of the reported numbers, e.g. ['matched_accuracy', 'mismatched_accuracy']."""
        return [s.metric_prefix + m for s in self.eval_splits for m in self.metrics]


GLUE_TASKS: dict[str, GlueTask] = {
    "mnli": GlueTask(
        "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"), ("accuracy",),
        eval_splits=(Split("dev_matched", "validation_matched", "matched_"),
                     Split("dev_mismatched", "validation_mismatched", "mismatched_"))),
    "qqp": GlueTask(
        "qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
        ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "qnli": GlueTask(
        "qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"),
        ("entailment", "not_entailment"), ("accuracy",)),
    "sst2": GlueTask(
        "sst2", "SST-2", ("sentence",), "label", ("sentence",),
        ("negative", "positive"), ("accuracy",)),
    "cola": GlueTask(
        "cola", "CoLA", ("sentence",), "label", ("sentence",),
        ("unacceptable", "acceptable"), ("matthews_corr",), headerless_columns=(3, 1)),
    "stsb": GlueTask(
        "stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"),
        None, ("pearson", "spearman")),
    "mrpc": GlueTask(
        "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "rte": GlueTask(
        "rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
        ("entailment", "not_entailment"), ("accuracy",)),
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> GlueTask:
    """Looks a task up by tfds name or GLUE folder name (case-insensitive)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; use some of {list(TASK_ORDER)} "
                         f"(WNLI is excluded by the recipe)")
    return GLUE_TASKS[key]


def parse_task_list(tasks: str | tuple | list) -> list[str]:
    """'mnli,rte' or ('mnli', 'rte') -> task names in the spec's order, no duplicates."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    chosen = {get_task(n).name for n in names if n.strip()}
    if not chosen:
        raise ValueError(f"no GLUE task selected in tasks={tasks!r}; e.g. tasks='mnli,rte'")
    return [t for t in TASK_ORDER if t in chosen]
