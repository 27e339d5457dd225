"""Data for MosaicBERT pretraining: corpus sources -> WordPiece tokens -> prepared shards ->
packed, masked, static-shape MLM batches. Heavy optional packages (tensorflow-datasets, seqio,
datasets, pyarrow) are imported only by the sources that need them."""

from mosaicbert_jax.data.batches import MLMBatches
from mosaicbert_jax.data.shards import check_vocab_fits, read_documents, read_metadata

__all__ = ["MLMBatches", "check_vocab_fits", "read_documents", "read_metadata"]
