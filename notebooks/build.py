"""Writes the notebooks of this folder from the cells below: `python notebooks/build.py`.

The .ipynb files are committed (Colab opens them from the repository); edit the cells here and
rebuild, so the three notebooks share one setup cell. `--check` exits 1 if a committed notebook
differs from what this file builds (tests/test_notebooks.py runs it).
"""

from __future__ import annotations

import json
import os
import sys

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
# Setup: use mosaicbert-jax if this Python has it (a checkout, CI). Otherwise install it from
# MOSAICBERT_SOURCE, with the JAX build for this runtime (CUDA on GPU, libtpu on TPU).
import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys

# Where to install mosaicbert-jax from when it is missing (or set the environment variable):
#   a git URL        "https://github.com/<you>/mosaicbert-jax" (cloned to ./mosaicbert-jax)
#   a checkout       "/content/mosaicbert-jax"
#   a wheel          "/content/mosaicbert_jax-0.1.0-py3-none-any.whl" (upload it in the Files
#                    pane; a wheel in the working directory is found without being named)
MOSAICBERT_SOURCE = os.environ.get("MOSAICBERT_SOURCE", "")
EXTRAS = [{extras}]
NEEDS_CHECKOUT = {needs_checkout}  # this notebook reads configs/ (and sample data) of a checkout
# MOSAICBERT_NOTEBOOK_SMALL=1: the smallest sizes that still run every cell (CI, a quick look).
SMALL = os.environ.get("MOSAICBERT_NOTEBOOK_SMALL", "") == "1"


def install_mosaicbert(source: str) -> None:
    """pip installs mosaicbert-jax (with EXTRAS) from a git URL, a directory or a wheel."""
    extras = EXTRAS + (["gpu"] if shutil.which("nvidia-smi") else [])
    suffix = f"[{{','.join(extras)}}]" if extras else ""
    on_tpu = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    if source.startswith(("https://", "http://", "git@", "git+", "ssh://")):
        if not os.path.isdir("mosaicbert-jax"):
            url = source[len("git+"):] if source.startswith("git+") else source
            subprocess.run(["git", "clone", "--depth=1", url, "mosaicbert-jax"], check=True)
        source = "mosaicbert-jax"
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "pyproject.toml")):
        requirement = ["-e", path + suffix]
        sys.path.insert(0, path)  # this kernel started before the editable install
    elif os.path.isfile(path) and path.endswith((".whl", ".tar.gz", ".zip")):
        requirement = [f"mosaicbert-jax{{suffix}} @ file://{{path}}"]
    else:
        raise FileNotFoundError(
            f"MOSAICBERT_SOURCE={{source!r}} is not a git URL, a mosaicbert-jax checkout (a "
            f"directory with pyproject.toml) or a wheel file; fix it at the top of this cell")
    print(f"installing mosaicbert-jax{{suffix}} from {{source}}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirement]
                   + (["jax[tpu]"] if on_tpu else []), check=True)
    importlib.invalidate_caches()


if importlib.util.find_spec("mosaicbert_jax") is None:
    uploaded = sorted(glob.glob("mosaicbert_jax-*.whl"))
    source = MOSAICBERT_SOURCE or (uploaded[-1] if uploaded else "") or (
        "mosaicbert-jax" if os.path.isdir("mosaicbert-jax") else "")
    if not source:
        raise RuntimeError(
            "mosaicbert-jax is not installed in this runtime. Set MOSAICBERT_SOURCE at the top "
            "of this cell to a git URL of the repository, the path of a checkout, or a wheel "
            "you uploaded (or upload mosaicbert_jax-*.whl to the working directory), then run "
            "this cell again.")
    install_mosaicbert(source)
import mosaicbert_jax

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(mosaicbert_jax.__file__)))
if NEEDS_CHECKOUT and not os.path.isdir(os.path.join(REPO_DIR, "configs")):
    raise RuntimeError(
        f"mosaicbert_jax is installed in {{REPO_DIR}} without the repository's configs/ (a wheel "
        f"install); this notebook needs a checkout: set MOSAICBERT_SOURCE to a git URL or a "
        f"checkout path and run this cell again in a new runtime")
PY = shlex.quote(sys.executable)  # this notebook's Python ("python" in a terminal)


def sh(command: str) -> None:
    """Runs a shell command, printing its output as it comes; unlike `!`, failing stops here."""
    print("$", command, flush=True)
    with subprocess.Popen(command, shell=True, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
    if process.returncode:
        raise RuntimeError(f"exit code {{process.returncode}}: {{command}}")


print("mosaicbert_jax", mosaicbert_jax.__version__, "from", REPO_DIR, "(small sizes)" * SMALL)'''


def setup_cell(*extras: str, needs_checkout: bool = True) -> str:
    return SETUP.format(extras=", ".join(f'"{e}"' for e in extras), needs_checkout=needs_checkout)


QUICKSTART = [
    ("markdown", """\
# MosaicBERT in JAX: quickstart

This notebook pretrains a tiny MosaicBERT on a corpus that ships with Python (no download),
asks it to fill in masked words, converts it to the PyTorch MosaicBERT layout and checks that
PyTorch computes the same logits as JAX.

It runs top to bottom on a CPU runtime in about two minutes (60 training steps). On a GPU or
TPU runtime it trains the tiny config's full 600 steps in about the same time. Every step has a
command-line twin, shown next to it."""),
    ("code", setup_cell("torch")),
    ("markdown", """\
## 1. Pretrain the tiny config

`configs/tiny.py`: a 1.4M-parameter MosaicBERT (2 layers, hidden 128, ALiBi attention, gated
GELU MLP) on the embedded corpus (CPython's documentation and docstrings, tokenized with a
WordPiece vocabulary trained on first use and cached in `~/.cache/mosaicbert_jax`), 30% masking,
batches of 32 x 128 tokens. The same run from a terminal:

```bash
python -m mosaicbert_jax.train --config=configs/tiny.py --workdir=mosaicbert-tiny --config.train.steps=60
```

Rerunning with the same workdir resumes from its newest checkpoint."""),
    ("code", """\
import runpy

import jax

from mosaicbert_jax.train import train_and_evaluate

BACKEND = jax.default_backend()
STEPS = 20 if SMALL else 60 if BACKEND == "cpu" else 600
WORKDIR = os.path.abspath("mosaicbert-tiny")
print(f"{BACKEND}: {jax.devices()}; training {STEPS} steps into {WORKDIR}")

config = runpy.run_path(os.path.join(REPO_DIR, "configs", "tiny.py"))["get_config"]()
if BACKEND == "gpu" and float(jax.devices()[0].compute_capability) < 8.0:
    config.model.attention_implementation = "xla"  # the Pallas kernel needs Ampere+ (not a T4)
config.train.steps = STEPS
config.train.log_every = max(STEPS // 6, 1)
config.train.eval_every = STEPS
config.train.checkpoint_every = STEPS
run = train_and_evaluate(config, WORKDIR)
print(sorted(os.listdir(WORKDIR)))"""),
    ("markdown", """\
The workdir holds the Orbax checkpoints (`checkpoints/<step>`), `metrics.jsonl`, TensorBoard
events (`tensorboard/`) and the data's `tokenizer.json`, which the commands below find by
themselves.

## 2. Fill in masked words

`python -m mosaicbert_jax.fill_mask --checkpoint DIR "text with [MASK]"` prints the top-k tokens
and their probabilities at every `[MASK]`. It runs on the CPU here (`JAX_PLATFORMS=cpu`) because
this notebook's own process holds the accelerator, if there is one. After 60 steps the model
only knows which words are frequent (`the`, `.`, `,` everywhere). After the full 600 steps
(about 6 minutes on 2 CPU cores) it uses the context: for "Return a new [MASK] of the items."
its top three were `return`, `list`, `object` in our run."""),
    ("code", """\
sh(f'JAX_PLATFORMS=cpu {PY} -m mosaicbert_jax.fill_mask --checkpoint {WORKDIR} --top-k 5 '
   f'"The [MASK] statement exits the innermost loop." "Return a new [MASK] of the items."')"""),
    ("markdown", """\
The same from Python: `load_pretrained` reads a workdir (its newest step), a
`save_pretrained` folder or a PyTorch folder; `fill_mask` returns `(token, probability)` pairs
per `[MASK]`, most likely first."""),
    ("code", """\
from mosaicbert_jax.checkpoint import load_pretrained
from mosaicbert_jax.data.tokenizer import load_tokenizer
from mosaicbert_jax.fill_mask import fill_mask

params, model_config = load_pretrained(WORKDIR)
tokenizer = load_tokenizer(os.path.join(WORKDIR, "tokenizer.json"))
text = "Use a [MASK] to store the values of the [MASK]."
for n, predictions in enumerate(fill_mask(params, model_config, tokenizer, text, top_k=5), 1):
    print(f"[MASK] {n}: " + ", ".join(f"{token} {p:.3f}" for token, p in predictions))"""),
    ("markdown", """\
## 3. Convert to PyTorch and compare

`convert to-torch` writes a Hugging Face style folder with the reference's parameter names
(`model.safetensors`, a `BertConfig` `config.json`, the tokenizer). `mosaicbert_jax.torch_model`
is a plain PyTorch MosaicBERT that loads it without remote code."""),
    ("code", """\
TORCH_DIR = os.path.abspath("mosaicbert-tiny-torch")
shutil.rmtree(TORCH_DIR, ignore_errors=True)  # convert never overwrites
sh(f"JAX_PLATFORMS=cpu {PY} -m mosaicbert_jax.convert to-torch --checkpoint {WORKDIR} "
   f"--out {TORCH_DIR}")
print(sorted(os.listdir(TORCH_DIR)))"""),
    ("code", """\
import numpy as np
import torch

from mosaicbert_jax import MosaicBertForMaskedLM
from mosaicbert_jax.torch_model import load_torch_model

texts = ["Lists are mutable sequences, typically used to store collections of items.",
         "The [MASK] function returns the number of items in a container."]
encodings = tokenizer.encode_batch(texts)
length = max(len(e.ids) for e in encodings)
input_ids = np.zeros((len(texts), length), np.int32)
for row, encoding in enumerate(encodings):
    input_ids[row, :len(encoding.ids)] = encoding.ids
real = input_ids != 0  # padding is id 0; JAX takes it as segment id 0, PyTorch as mask 0

with jax.default_matmul_precision("highest"):  # full fp32 matmuls on GPU/TPU too
    jax_logits = np.asarray(MosaicBertForMaskedLM(model_config.replace(dtype="float32")).apply(
        {"params": params}, input_ids, real.astype(np.int32)))
torch_model = load_torch_model(TORCH_DIR)
with torch.no_grad():
    torch_logits = torch_model(torch.from_numpy(input_ids).long(),
                               torch.from_numpy(real).long()).numpy()

difference = np.abs(jax_logits[real] - torch_logits[real]).max()
same_top1 = (jax_logits.argmax(-1) == torch_logits.argmax(-1))[real].mean()
print(f"logits {jax_logits.shape}: max |JAX - PyTorch| = {difference:.2e}, "
      f"same top-1 token at {same_top1:.0%} of positions")
assert difference < 1e-3 and same_top1 == 1.0"""),
    ("markdown", """\
## Next

- `02_glue_finetune.ipynb`: fine-tune a checkpoint on a GLUE task.
- `03_attention_kernel.ipynb`: how the ALiBi flash-attention kernel works, with a speed plot.
- `docs/launch.md`: pretraining MosaicBERT-base on C4 on 8 GPUs, a SLURM cluster or a TPU pod."""),
]

GLUE = [
    ("markdown", """\
# Fine-tune MosaicBERT on GLUE (SST-2)

`python -m mosaicbert_jax.glue` fine-tunes a pretrained checkpoint with the reference recipe
(`configs/glue.py`: per-task learning rate, decoupled weight decay, epochs, batch size, 6% warmup
then linear decay) and writes the dev metrics to a JSON file. This notebook runs it on SST-2
(binary sentiment of movie-review sentences).

- **Data:** without `GLUE_DIR` it runs offline on a small synthetic sample in the SST-2 layout
  that ships with the repository (`notebooks/glue_sample`: 480 train and 120 dev sentences
  made from templates; not SST-2's sentences). Set `GLUE_DIR` to a folder holding
  `SST-2/train.tsv` and `SST-2/dev.tsv` for the real task, or `GLUE_DIR=download` to fetch it.
- **CPU runtime:** starts from the tiny model of `01_quickstart.ipynb` (pretrained here if its
  workdir is missing) and fine-tunes in float32, with a learning rate for its size (1e-3); on
  real SST-2, on 8,000 training sentences for one epoch. Do not expect much from a
  1.4M-parameter model pretrained for a minute on Python's documentation.
- **GPU / TPU runtime:** starts from the released MosaicBERT-base (`mosaicml/mosaic-bert-base`,
  converted from PyTorch; downloaded) and runs the full recipe (3 epochs, bfloat16; on real
  SST-2 its 67k sentences).

All heavy work runs in subprocesses, so the accelerator stays free for them."""),
    ("code", setup_cell("torch")),
    ("code", """\
# What this runtime has, asked in a subprocess so this kernel never holds the accelerator.
probe = ("import jax; d = jax.devices()[0]; "
         "print(jax.default_backend(), getattr(d, 'compute_capability', 0))")
BACKEND, CAPABILITY = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                     text=True, check=True).stdout.split()[-2:]
ON_CPU = BACKEND == "cpu"
OLD_GPU = BACKEND == "gpu" and float(CAPABILITY) < 8.0  # e.g. a T4: no bf16, no Pallas kernel
START_FROM = "tiny" if ON_CPU or SMALL else "mosaic-bert-base"  # either works anywhere
GLUE_DIR = os.environ.get("GLUE_DIR", "")  # "": the sample; "download": real SST-2
TRAIN_EXAMPLES = 8000 if ON_CPU and GLUE_DIR else None  # None: all (67,349 in real SST-2)
EPOCHS = 1 if SMALL or (ON_CPU and GLUE_DIR) else 3  # the recipe: 3
PRETRAIN_STEPS = 20 if SMALL else 60  # for the tiny start point, when it is not there yet
DTYPE = "float32" if ON_CPU or OLD_GPU else "bfloat16"
ATTENTION = "xla" if OLD_GPU else "auto"
print(BACKEND, START_FROM, GLUE_DIR or "sample", TRAIN_EXAMPLES, EPOCHS, DTYPE, ATTENTION)"""),
    ("markdown", """\
## 1. The pretrained start point

`--config.checkpoint` takes anything `load_pretrained` reads: a training workdir, a
`save_pretrained` folder or a PyTorch folder. Only the encoder is used; the pooler and
classifier start fresh."""),
    ("code", """\
if START_FROM == "tiny":
    CHECKPOINT = os.path.abspath("mosaicbert-tiny")  # the quickstart's workdir
    if not os.path.isdir(os.path.join(CHECKPOINT, "checkpoints")):
        sh(f"{PY} -m mosaicbert_jax.train --config={REPO_DIR}/configs/tiny.py "
           f"--workdir={CHECKPOINT} --config.train.steps={PRETRAIN_STEPS} "
           f"--config.train.eval_every={PRETRAIN_STEPS} "
           f"--config.train.checkpoint_every={PRETRAIN_STEPS} "
           f"--config.model.attention_implementation={ATTENTION}")
    TOKENIZER = os.path.join(CHECKPOINT, "tokenizer.json")
else:
    # The released weights (PyTorch) and the bert-base-uncased vocabulary they were trained with.
    from huggingface_hub import hf_hub_download, snapshot_download
    snapshot_download("mosaicml/mosaic-bert-base", local_dir="mosaic-bert-base")
    TOKENIZER = hf_hub_download("bert-base-uncased", "tokenizer.json")
    CHECKPOINT = os.path.abspath("mosaicbert-jax-base")
    if not os.path.isdir(CHECKPOINT):
        sh(f"JAX_PLATFORMS=cpu {PY} -m mosaicbert_jax.convert from-torch --src mosaic-bert-base "
           f"--out {CHECKPOINT}")
print(CHECKPOINT, TOKENIZER)"""),
    ("markdown", """\
## 2. SST-2 in the GLUE layout

`--config.data_dir` is a folder in the official GLUE TSV layout (`SST-2/train.tsv`,
`SST-2/dev.tsv`: a header, then `sentence<TAB>label` rows). Without it the command reads
`glue/sst2` from tensorflow-datasets instead. Here it is the synthetic sample, unless
`GLUE_DIR` names a copy of SST-2 (or is `download`)."""),
    ("code", """\
import csv
import io
import urllib.request
import zipfile

if not GLUE_DIR:  # offline: the synthetic sample of the checkout
    GLUE_DIR = os.path.join(REPO_DIR, "notebooks", "glue_sample")
    print(f"no GLUE_DIR: using the synthetic SST-2-format sample in {GLUE_DIR}")
elif GLUE_DIR == "download":
    GLUE_DIR = os.path.abspath("glue_data")
    if not os.path.isfile(os.path.join(GLUE_DIR, "SST-2", "dev.tsv")):
        url = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
        with urllib.request.urlopen(url, timeout=120) as response:
            zipfile.ZipFile(io.BytesIO(response.read())).extractall(GLUE_DIR)
GLUE_DIR = os.path.abspath(GLUE_DIR)
if not os.path.isfile(os.path.join(GLUE_DIR, "SST-2", "train.tsv")):
    raise FileNotFoundError(f"GLUE_DIR={GLUE_DIR} has no SST-2/train.tsv; point it at a GLUE "
                            f"folder, or unset it to use the sample")

DATA_DIR = GLUE_DIR
if TRAIN_EXAMPLES:  # a smaller training set, same dev set: a copy in the same layout
    DATA_DIR = os.path.abspath("glue_data_small")
    os.makedirs(os.path.join(DATA_DIR, "SST-2"), exist_ok=True)
    with open(os.path.join(GLUE_DIR, "SST-2", "train.tsv")) as f:
        lines = f.readlines()[:TRAIN_EXAMPLES + 1]  # the header and the first sentences
    with open(os.path.join(DATA_DIR, "SST-2", "train.tsv"), "w") as f:
        f.writelines(lines)
    shutil.copy(os.path.join(GLUE_DIR, "SST-2", "dev.tsv"), os.path.join(DATA_DIR, "SST-2"))

with open(os.path.join(DATA_DIR, "SST-2", "dev.tsv")) as f:
    dev = list(csv.DictReader(f, delimiter="\\t", quoting=csv.QUOTE_NONE))
print(len(dev), "dev sentences, e.g.", dev[0])"""),
    ("markdown", """\
## 3. Fine-tune

One seed here (the recipe's SST-2 median is over 3: `--config.per_task.sst2.seeds=...`). Any
config key can be overridden on the command line; `--config.tasks=mnli,sst2,...` runs more tasks
(RTE, MRPC and STS-B then start from the MNLI-finetuned weights, as the reference does)."""),
    ("code", """\
GLUE_WORKDIR = os.path.abspath("glue-sst2")
# The recipe's learning rate (3e-5) is for MosaicBERT-base; the tiny model needs a larger one.
learning_rate = "--config.per_task.sst2.learning_rate=1e-3" if START_FROM == "tiny" else ""
sh(f"{PY} -m mosaicbert_jax.glue --config={REPO_DIR}/configs/glue.py "
   f"--config.checkpoint={CHECKPOINT} --config.tokenizer={TOKENIZER} "
   f"--config.data_dir={DATA_DIR} --config.tasks=sst2 --config.workdir={GLUE_WORKDIR} "
   f"--config.per_task.sst2.seeds='(19,)' --config.per_task.sst2.epochs={EPOCHS} "
   f"--config.dtype={DTYPE} --config.attention_implementation={ATTENTION} "
   f"--config.log_every_steps=100 {learning_rate}")"""),
    ("markdown", """\
## 4. Results

`glue_results.json` holds every number (per seed, per epoch, data counts, the config), and
`predictions/<task>/seed_<s>/dev.tsv` each dev example's prediction."""),
    ("code", """\
import json

with open(os.path.join(GLUE_WORKDIR, "glue_results.json")) as f:
    results = json.load(f)
print("SST-2 dev:", results["tasks"]["sst2"]["metrics"])

with open(os.path.join(GLUE_WORKDIR, "predictions", "sst2", "seed_19", "dev.tsv")) as f:
    predictions = list(csv.DictReader(f, delimiter="\\t"))
labels = {0: "negative", 1: "positive"}
for row in predictions[:8]:
    example = dev[int(row["index"])]
    predicted, gold = labels[int(float(row["prediction"]))], labels[int(example["label"])]
    verdict = "right" if predicted == gold else "wrong"
    print(f"{predicted:>8s} ({verdict})  {example['sentence']}")"""),
]

ATTENTION = [
    ("markdown", """\
# Inside the attention kernel: ALiBi, packed documents, block skipping

MosaicBERT's attention is

$$\\mathrm{softmax}\\big(q k^\\top / \\sqrt{d} - m_h\\,|i - j| + \\mathrm{mask}\\big)\\,v$$

with a per-head ALiBi slope $m_h$ instead of position embeddings, and a mask that keeps each
token inside its own document when several documents are packed into one row (and away from
padding). This notebook builds that up from the pieces in `mosaicbert_jax.attention`, checks the
implementations against each other and times them. On a CPU runtime it times the XLA
reference; on a GPU it adds the Pallas flash kernel and cuDNN."""),
    ("code", setup_cell("notebooks", needs_checkout=False)),
    ("code", """\
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from mosaicbert_jax import alibi_slopes, attention
from mosaicbert_jax.attention import available_implementations
from mosaicbert_jax.attention.block_sparsity import visible_block_pairs
from mosaicbert_jax.attention.reference import alibi_bias, segment_mask

BACKEND = jax.default_backend()
print(BACKEND, jax.devices())"""),
    ("markdown", """\
## 1. ALiBi slopes

For $n$ heads, a power of two, slope $k$ is $2^{-8(k+1)/n}$. For 12 heads the reference takes
the 8-head list $2^{-1} \\dots 2^{-8}$ and appends every other slope of the 16-head list."""),
    ("code", """\
slopes = alibi_slopes(12)
print(np.round(np.log2(slopes), 2))  # -1 ... -8, then -0.5, -1.5, -2.5, -3.5
expected = [2.0 ** -(k + 1) for k in range(8)] + [2.0 ** -(k + 0.5) for k in range(4)]
np.testing.assert_allclose(slopes, expected)"""),
    ("markdown", """\
## 2. The bias a row of packed documents sees

One row of 64 tokens: a document of 24 tokens, one of 28, then 12 of padding (segment ids
1, 2 and 0). Each head adds $-m_h |i - j|$; the mask removes everything across documents and
all padding keys."""),
    ("code", """\
segment_ids = np.array([[1] * 24 + [2] * 28 + [0] * 12], np.int32)
seq = segment_ids.shape[1]
bias = np.asarray(alibi_bias(jnp.asarray(slopes), seq))                 # [heads, q, k]
visible = np.asarray(segment_mask(jnp.asarray(segment_ids)))[0]          # [q, k]

# One colour scale for all heads: steep slopes look only at neighbours, gentle ones far away.
heads = (8, 3, 7)  # the steepest, a middle and the gentlest slope
low = min(bias[head][visible].min() for head in heads)
fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
for ax, head in zip(axes, heads):
    image = ax.imshow(np.where(visible, bias[head], np.nan), cmap="viridis", vmin=low, vmax=0)
    ax.set_title(f"head {head}: slope 2^{np.log2(slopes[head]):.1f}")
    ax.set_xlabel("key"), ax.set_ylabel("query")
fig.colorbar(image, ax=axes, label="bias added to q.k/sqrt(d); white: masked")
plt.show()"""),
    ("markdown", """\
## 3. The XLA reference against the formula

`attention(q, k, v, segment_ids, slopes, implementation=...)` takes `[batch, seq, heads,
head_dim]`. The `xla` implementation materialises logits and bias; it is what the kernels are
tested against. Here it is checked against a direct NumPy transcription of the formula."""),
    ("code", """\
rng = np.random.default_rng(0)
q, k, v = (rng.normal(size=(1, seq, 12, 64)).astype(np.float32) for _ in range(3))
out = np.asarray(attention(q, k, v, segment_ids, slopes, implementation="xla"))

logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(64) + bias[None]
logits = np.where(visible, logits, -1e30)
probs = np.where(visible, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-30)        # padding queries: all zero
expected = np.einsum("bhqk,bkhd->bqhd", probs, v)
print("max |xla - formula| =", np.abs(out - expected).max())
print("padding rows are zero:", np.abs(out[0, 52:]).max() == 0)"""),
    ("markdown", """\
## 4. Block skipping

The flash kernel walks the attention matrix in tiles. Before it runs, a cheap reduction finds
each tile row's range of key tiles that can hold a visible pair (documents are contiguous runs,
so this range is exact); the kernel never visits the rest. For a 512-token row holding four
documents and some padding, most tiles are skipped:"""),
    ("code", """\
lengths = [160, 96, 128, 64]  # four documents, then 64 tokens of padding
row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(64)])
row = row.astype(np.int32)[None]
tiles = np.asarray(visible_block_pairs(jnp.asarray(row), 64, 64))[0]
pairs = np.asarray(segment_mask(jnp.asarray(row)))[0]

fig, axes = plt.subplots(1, 2, figsize=(9, 4))
axes[0].imshow(pairs, cmap="Greys"), axes[0].set_title("visible (query, key) pairs")
axes[1].imshow(tiles, cmap="Greys"), axes[1].set_title("64 x 64 tiles the kernel visits")
plt.tight_layout()
plt.show()
print(f"tiles visited: {tiles.mean():.0%}; visible pairs: {pairs.mean():.0%}")"""),
    ("markdown", """\
## 5. The kernels agree

On a GPU, `pallas` is our flash kernel (Pallas, Triton backend) and `cudnn` is
`jax.nn.dot_product_attention` with the bias materialised; on a TPU, `pallas` is the TPU
kernel. On a CPU the GPU kernel runs in the Pallas interpreter (slow, so on a small input).
Outputs enter through a loss, so the gradients dq, dk, dv are compared too."""),
    ("code", """\
def loss(impl, q, k, v, segment_ids):
    out = attention(q, k, v, segment_ids, alibi_slopes(4), implementation=impl)
    return jnp.sum(out.astype(jnp.float32) ** 2)

# "pallas" is the flash kernel of the backend: on GPU it needs an Ampere or newer chip (A100,
# L4, H100; not a T4); on TPU the TPU kernel. Elsewhere the GPU kernel runs interpreted.
if BACKEND == "gpu":
    KERNEL = float(jax.devices()[0].compute_capability) >= 8.0
else:
    KERNEL = BACKEND == "tpu" and "pallas_tpu" in available_implementations()
candidates = (["pallas"] if KERNEL else []) + (["cudnn"] if BACKEND == "gpu" else [])
candidates = candidates or ["pallas_interpret"]
dtype = jnp.bfloat16 if BACKEND == "gpu" else jnp.float32
seq_check = 256 if BACKEND == "gpu" else 128
ids = np.ones((2, seq_check), np.int32)
ids[0, seq_check // 2:] = 2         # row 0: two documents
ids[1, seq_check - 40:] = 0         # row 1: one document and padding
q4, k4, v4 = (jnp.asarray(rng.normal(size=(2, seq_check, 4, 64)), dtype) for _ in range(3))
grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
(ref_value, ref_grads) = grad("xla", q4.astype(jnp.float32), k4.astype(jnp.float32),
                              v4.astype(jnp.float32), ids)
for impl in candidates:
    value, grads = grad(impl, q4, k4, v4, ids)
    errors = [float(jnp.abs(g.astype(jnp.float32) - r).max()) for g, r in zip(grads, ref_grads)]
    print(f"{impl:>16s}: loss {float(value):.2f} vs {float(ref_value):.2f}; "
          f"max |dq, dk, dv - reference| = {errors}")"""),
    ("markdown", """\
## 6. Speed

Forward + backward time of each implementation at several sequence lengths, the number of
tokens fixed (batch = tokens / seq), rows of two documents, 12 heads of 64. The flash kernel
never builds the `[heads, seq, seq]` bias or score tensors, and skips half of the tiles of
rows of two documents."""),
    ("code", """\
def time_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


repeats = 2 if SMALL else 5
if BACKEND == "cpu":
    impls, tokens, seq_lens, dtype = ["xla"], 2048, [128, 256, 512, 1024], jnp.float32
    if SMALL:
        tokens, seq_lens = 1024, [128, 256]
else:
    impls = ["xla"] + (["cudnn"] if BACKEND == "gpu" else []) + (["pallas"] if KERNEL else [])
    tokens, seq_lens, dtype = 16384, [128, 256, 512, 1024, 2048, 4096], jnp.bfloat16

timings = {impl: [] for impl in impls}
for seq_len in seq_lens:
    batch = tokens // seq_len
    ids = np.ones((batch, seq_len), np.int32)
    ids[:, seq_len // 2:] = 2
    q, k, v = (jnp.asarray(rng.normal(size=(batch, seq_len, 12, 64)), dtype) for _ in range(3))
    for impl in impls:
        step = jax.jit(jax.grad(lambda q, k, v, impl=impl, ids=ids: jnp.sum(
            attention(q, k, v, ids, slopes, implementation=impl).astype(jnp.float32)),
            argnums=(0, 1, 2)))
        try:
            timings[impl].append(time_ms(step, q, k, v, repeats=repeats))
        except jax.errors.JaxRuntimeError as error:  # e.g. XLA's [heads, seq, seq] tensors OOM
            print(f"{impl} at {seq_len}: {str(error).splitlines()[0][:100]}")
            timings[impl].append(float("nan"))
    print(seq_len, {impl: f"{t[-1]:.2f} ms" for impl, t in timings.items()})"""),
    ("code", """\
plt.figure(figsize=(6, 4))
for impl, ms in timings.items():
    plt.plot(seq_lens, ms, "o-", label=impl)
plt.xscale("log", base=2), plt.yscale("log")
plt.xlabel(f"sequence length (batch = {tokens} tokens / length)")
plt.ylabel("forward + backward, ms")
plt.title(f"ALiBi attention, 12 heads x 64, two documents per row ({BACKEND})")
plt.legend(), plt.grid(True, which="both", alpha=0.3)
plt.show()"""),
    ("markdown", """\
More: `docs/attention.md` (how the kernel works: ALiBi rebuilt per tile from two iotas, one
integer compare for both masks, log2-domain softmax, FlashAttention-2 backward, mask-free
interior tiles) and `benchmarks/attention.py` (the full benchmark with tokamax baselines)."""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_glue_finetune.ipynb": GLUE,
    "03_attention_kernel.ipynb": ATTENTION,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook with stable cell ids (so rebuilding changes nothing) and no outputs."""
    notebook = v4.new_notebook()
    for index, (kind, source) in enumerate(cells):
        cell = v4.new_markdown_cell(source) if kind == "markdown" else v4.new_code_cell(source)
        cell["id"] = f"cell-{index:02d}"
        notebook.cells.append(cell)
    notebook.metadata = {
        "colab": {"provenance": [], "toc_visible": True},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(notebook)
    return notebook


def render(cells: list[tuple[str, str]]) -> str:
    return json.dumps(build(cells), indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = os.path.join(HERE, name)
        text = render(cells)
        if check:
            with open(path) if os.path.exists(path) else open(os.devnull) as f:
                if f.read() != text:
                    stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print("wrote", path)
    if stale:
        print("out of date (run python notebooks/build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
