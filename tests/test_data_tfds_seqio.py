"""TFDS and seqio sources on a small TFDS dataset built from local files (nothing downloaded).

Skipped when tensorflow-datasets / seqio are not installed (optional extras tfds / seqio).
"""

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mosaicbert_jax.data import read_documents  # noqa: E402
from mosaicbert_jax.data.prepare import prepare  # noqa: E402
from mosaicbert_jax.data.sources import open_source  # noqa: E402
from mosaicbert_jax.data.tokenizer import train_wordpiece  # noqa: E402

LINES = {"train": [f"Training document number {i} talks about topic {i % 7}." for i in range(40)],
         "validation": [f"Held out document {i} is about something else." for i in range(8)]}


class MosaicbertLocalText(tfds.core.GeneratorBasedBuilder):
    """A text dataset generated from local lines, standing in for c4/en in tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(lines) for split, lines in LINES.items()}

    def _generate_examples(self, lines):
        for index, line in enumerate(lines):
            yield index, {"text": line}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    builder = MosaicbertLocalText(data_dir=path)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return path


def test_tfds_source_reads_a_local_dataset(data_dir, tmp_path):
    train = open_source(f"tfds:mosaicbert_local_text?split=train&data_dir={data_dir}")
    assert list(train) == LINES["train"]
    evaluation = open_source(f"tfds:mosaicbert_local_text?split=validation&data_dir={data_dir}")
    tokenizer = train_wordpiece(LINES["train"], vocab_size=200)
    meta = prepare(str(tmp_path), tokenizer, train, evaluation, progress=False)
    assert meta["splits"]["eval"]["num_documents"] == 8
    assert len(list(read_documents(str(tmp_path), "train"))) == 40


def test_tfds_errors_name_the_fix(data_dir, tmp_path):
    with pytest.raises(ValueError, match="no feature 'body'"):
        list(open_source(f"tfds:mosaicbert_local_text?field=body&data_dir={data_dir}"))
    with pytest.raises(ValueError, match="not prepared"):
        list(open_source(f"tfds:mosaicbert_local_text?data_dir={tmp_path}"))


def test_seqio_task_over_tfds(data_dir):
    seqio = pytest.importorskip("seqio")
    from mosaicbert_jax.data.seqio_source import (C4_TASK_NAME, register_c4_text_task,
                                                  register_text_task)

    register_text_task("mosaicbert_test_local_text", seqio.TfdsDataSource(
        tfds_name="mosaicbert_local_text:1.0.0", tfds_data_dir=data_dir))
    source = open_source("seqio:mosaicbert_test_local_text?split=validation")
    assert list(source) == LINES["validation"]
    task = register_c4_text_task()
    assert task.name == C4_TASK_NAME and seqio.get_mixture_or_task(C4_TASK_NAME) is task
    assert task.source.tfds_dataset.name == "c4/en:3.1.0"
    assert set(task.output_features) == {"text"}
