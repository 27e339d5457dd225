"""GLUE fine-tuning and evaluation of MosaicBERT: `python -m mosaicbert_jax.glue --config=...`."""

from mosaicbert_jax.glue.finetune import FinetuneResult, finetune
from mosaicbert_jax.glue.metrics import (accuracy, compute_metrics, f1_binary,
                                         matthews_corrcoef, pearson, spearman)
from mosaicbert_jax.glue.runner import run_glue
from mosaicbert_jax.glue.tasks import GLUE_TASKS, TASK_ORDER, GlueTask, get_task

__all__ = [
    "FinetuneResult", "GLUE_TASKS", "GlueTask", "TASK_ORDER", "accuracy",
    "compute_metrics", "f1_binary", "finetune", "get_task", "matthews_corrcoef", "pearson",
    "run_glue", "spearman",
]
