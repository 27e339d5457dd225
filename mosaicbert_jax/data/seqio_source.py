"""seqio integration for users of the T5 tooling: a text Task for C4 and a source reading any Task.

Optional extra: pip install 'mosaicbert-jax[seqio]'. `register_c4_text_task` registers a Task
whose examples are {"text": document} read from TFDS `c4/en`; `SeqioSource` turns the text
feature of any registered Task or Mixture into documents for `prepare` (e.g. `--train
seqio:mosaicbert_c4_en_text?split=train`). Tokenization stays with our WordPiece tokenizer, so
the Task's feature is raw text (a pass-through vocabulary).
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional

C4_TASK_NAME = "mosaicbert_c4_en_text"


def _import_seqio():
    try:
        import seqio
        import tensorflow as tf
    except ImportError as error:
        raise ImportError("the seqio source needs seqio: pip install 'mosaicbert-jax[seqio]'"
                          ) from error
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices
        pass
    return seqio, tf


def register_text_task(name: str, source, text_key: str = "text"):
    """Registers (or replaces) a seqio Task yielding {"text": string} from `source`'s `text_key`."""
    seqio, tf = _import_seqio()
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"text": text_key})],
        output_features={"text": seqio.Feature(seqio.PassThroughVocabulary(size=0),
                                               add_eos=False, dtype=tf.string, rank=0)})


def register_c4_text_task(name: str = C4_TASK_NAME, tfds_name: str = "c4/en:3.1.0",
                          tfds_data_dir: Optional[str] = None):
    """Registers the C4 English text Task (TFDS `c4/en`, the MosaicBERT pretraining corpus)."""
    seqio, _ = _import_seqio()
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)
    return register_text_task(name, source, text_key="text")


class SeqioSource:
    """Documents from the `field` feature of a seqio Task or Mixture split (unshuffled, 1 epoch)."""

    def __init__(self, task_name: str, split: str = "train", field: str = "text"):
        self.task_name, self.split, self.field = task_name, split, field
        self.spec = f"seqio:{task_name}?split={split}&field={field}"

    def __iter__(self) -> Iterator[str]:
        seqio, _ = _import_seqio()
        if self.task_name == C4_TASK_NAME and C4_TASK_NAME not in seqio.TaskRegistry.names():
            register_c4_text_task()
        try:
            task = seqio.get_mixture_or_task(self.task_name)
        except ValueError as error:
            raise ValueError(f"seqio has no Task or Mixture {self.task_name!r}; import the module "
                             f"that registers it first") from error
        dataset = task.get_dataset(sequence_length=None, split=self.split, shuffle=False,
                                   num_epochs=1, use_cached=False)
        if self.field not in dataset.element_spec:
            raise ValueError(f"seqio task {self.task_name!r} has no feature {self.field!r} "
                             f"(features: {sorted(dataset.element_spec)}); pass field=NAME")
        for example in dataset.as_numpy_iterator():
            text = example[self.field]
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
