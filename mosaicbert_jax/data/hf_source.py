"""Hugging Face `datasets` source: a hub dataset (e.g. allenai/c4, config en) or local files.

Optional extra: pip install 'mosaicbert-jax[hf]'. Hub datasets stream (nothing is stored
beyond the hub's cache); a builder name such as "json" or "parquet" with `data_files` reads
local files.
"""

from __future__ import annotations

from typing import Iterator, Optional


class HuggingFaceSource:
    """Documents from the `field` column of a `datasets` split, streamed in order."""

    def __init__(self, name: str, split: str = "train", config: Optional[str] = None,
                 field: str = "text", data_files: Optional[str] = None):
        self.name, self.split, self.config = name, split, config
        self.field, self.data_files = field, data_files
        options = [f"split={split}", f"field={field}"]
        options += [f"config={config}"] if config else []
        options += [f"data_files={data_files}"] if data_files else []
        self.spec = f"hf:{name}?" + "&".join(options)

    def __iter__(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as error:
            raise ImportError("the hf source needs Hugging Face datasets: "
                              "pip install 'mosaicbert-jax[hf]'") from error
        dataset = datasets.load_dataset(self.name, self.config, split=self.split,
                                        data_files=self.data_files, streaming=True)
        for index, example in enumerate(dataset):
            text = example.get(self.field)
            if not isinstance(text, str):
                raise ValueError(f"dataset {self.name!r} example {index}: no string field "
                                 f"{self.field!r} (found {sorted(example)}); pass field=NAME")
            yield text
