"""GLUE fine-tuning of MosaicBERT with the reference recipe (see docs/glue.md).

  python -m mosaicbert_jax.glue --config=configs/glue.py --config.checkpoint=<pretrained dir>
  python -m mosaicbert_jax.glue --config=configs/glue.py --config.checkpoint=<dir> \
      --config.tasks=rte,mrpc --config.data_dir=/data/glue --config.parallel_tasks=True

Per-task numbers are the reference's (MosaicML examples, bert/src/glue/finetuning_jobs.py and
yamls/finetuning/glue/mosaic-bert-base-uncased.yaml). weight_decay is decoupled and absolute:
p -= weight_decay * (lr_t / lr_peak) * p.
"""

import ml_collections
from ml_collections import config_dict

# The reference's seeds: the first is the default seed, small tasks use several.
_SEEDS = (19, 8364, 717, 10536, 90166)


def _task(learning_rate, weight_decay, epochs, batch_size, num_seeds):
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, weight_decay=weight_decay, epochs=epochs,
        batch_size=batch_size, seeds=_SEEDS[:num_seeds]))


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Start point: a directory written by mosaicbert_jax.checkpoint.save_pretrained. Unset:
    # random init of the `model` preset (only useful for smoke tests).
    config.checkpoint = config_dict.placeholder(str)
    config.model = "base"
    # tokenizer.json or vocab.txt; unset: the one saved in the checkpoint directory.
    config.tokenizer = config_dict.placeholder(str)

    # Data: a folder in the official GLUE TSV layout (MNLI/train.tsv, SST-2/dev.tsv, ...);
    # unset: tensorflow-datasets glue/<task> (pip install 'mosaicbert-jax[tfds]').
    config.data_dir = config_dict.placeholder(str)
    config.tfds_data_dir = config_dict.placeholder(str)

    # Which tasks, comma separated (run in the spec's order; WNLI is excluded).
    config.tasks = "mnli,qqp,qnli,sst2,cola,stsb,mrpc,rte"
    # These start from the MNLI-finetuned weights (MNLI's first seed) instead of pretrained.
    config.start_from_mnli = ("rte", "mrpc", "stsb")
    # Without MNLI among the tasks, start those from saved MNLI weights (the save_pretrained
    # folder <workdir>/mnli_finetuned_seed<S> that a run with MNLI writes when
    # save_mnli_checkpoint is True; `convert to-torch` converts it too).
    config.mnli_checkpoint = config_dict.placeholder(str)
    config.save_mnli_checkpoint = True

    # Sequences: pairs are [CLS] a [SEP] b [SEP] with token type ids, longest-first truncated
    # to max_seq_len (counted in the output). Batches are padded to the smallest bucket length
    # that fits; group_by_length batches examples of one bucket together (least padding).
    config.max_seq_len = 256
    config.bucket_lengths = (32, 64, 128, 256)
    config.group_by_length = True
    config.eval_batch_size = 128

    # Numerics: compute dtype (bfloat16 on GPU; float32 for CPU tests), fp32 master weights.
    config.dtype = "bfloat16"
    config.attention_implementation = "auto"

    # Optimizer shared by all tasks: decoupled AdamW; 6% linear warmup, linear decay to 0.
    config.optimizer = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.98, eps=1e-6, warmup_fraction=0.06,
        clip_norm=config_dict.placeholder(float)))

    # Per task: peak lr, decoupled weight decay, epochs, batch size, seeds (median reported).
    config.per_task = ml_collections.ConfigDict(dict(
        mnli=_task(5.0e-5, 5.0e-6, 3, 48, 1),
        qqp=_task(3.0e-5, 3.0e-6, 5, 16, 1),
        qnli=_task(1.0e-5, 1.0e-6, 10, 16, 1),
        sst2=_task(3.0e-5, 3.0e-6, 3, 16, 3),
        cola=_task(5.0e-5, 5.0e-6, 10, 32, 4),
        stsb=_task(3.0e-5, 3.0e-6, 10, 32, 5),
        mrpc=_task(8.0e-5, 8.0e-6, 10, 32, 5),
        rte=_task(1.0e-5, 1.0e-5, 3, 16, 5),
    ))

    # Devices: False runs jobs one after another, each data parallel over all local devices;
    # True runs one (task, seed) job per device at once (RTE/MRPC/STS-B wait for MNLI).
    config.parallel_tasks = False

    # Output: progress every log_every_steps, eval after each epoch (the final one is reported),
    # results JSON (default <workdir>/glue_results.json), dev predictions per task and seed,
    # metrics.jsonl + TensorBoard events per job in <workdir>/logs/<task>/seed_<seed>/.
    config.workdir = ""  # empty: <the checkpoint's folder>/glue
    config.results_json = config_dict.placeholder(str)
    config.log_every_steps = 100
    config.eval_every_epoch = True
    config.write_predictions = True
    return config
