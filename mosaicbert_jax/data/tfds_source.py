"""TensorFlow Datasets source, for C4 English (`c4/en`) and any TFDS dataset with a text feature.

Optional extra: pip install 'mosaicbert-jax[tfds]'. TFDS does not download C4 for you in a
usable way (building it takes an Apache Beam job); point `data_dir` at a prepared copy, e.g.
gs://tfds-data/datasets (public, read through TensorFlow's GCS filesystem) or a local directory
where `tfds build c4/en` ran. TensorFlow is kept off the GPUs, which belong to JAX.
"""

from __future__ import annotations

from typing import Iterator, Optional


def import_tfds():
    """tensorflow_datasets, with TensorFlow kept on the CPU; a clear error when not installed."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("the tfds source needs TensorFlow Datasets: "
                          "pip install 'mosaicbert-jax[tfds]'") from error
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing more to do
        pass
    return tfds


class TfdsSource:
    """Documents from the `field` feature (bytes or str) of a TFDS dataset split, in file order."""

    def __init__(self, name: str = "c4/en", split: str = "train", data_dir: Optional[str] = None,
                 field: str = "text"):
        self.name, self.split, self.data_dir, self.field = name, split, data_dir, field
        self.spec = f"tfds:{name}?split={split}&field={field}" + (
            f"&data_dir={data_dir}" if data_dir else "")

    def __iter__(self) -> Iterator[str]:
        tfds = import_tfds()
        builder = tfds.builder(self.name, data_dir=self.data_dir)
        if not builder.is_prepared():
            raise ValueError(
                f"TFDS dataset {self.name!r} is not prepared in {builder.data_dir}; build it "
                f"(`tfds build {self.name} --data_dir DIR`) or pass data_dir of a prepared copy "
                f"(for C4: data_dir=gs://tfds-data/datasets)")
        features = builder.info.features
        if self.field not in features:
            raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.field!r} (features: "
                             f"{sorted(features.keys())}); pass field=NAME")
        dataset = builder.as_dataset(split=self.split, shuffle_files=False)
        for example in tfds.as_numpy(dataset):
            text = example[self.field]
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
