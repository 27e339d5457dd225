"""`convert from-torch --src mosaicml/mosaic-bert-base` offline, from a Hugging Face cache laid
out as huggingface_hub lays it out (models--org--name/{blobs,refs/main,snapshots/<commit>}, the
snapshot's files symlinks into blobs), built here from the original-format golden state dict."""

import hashlib
import json
import os

import numpy as np
import pytest

from mosaicbert_jax.checkpoint import load_pretrained
from mosaicbert_jax.convert import main
from mosaicbert_jax.hub import RELEASED_REPOS, is_hub_name
from mosaicbert_jax.param_layout import config_from_hf_json, torch_state_dict_to_flax

pytest.importorskip("huggingface_hub")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "golden_original")
COMMIT = "29c19994cf60bf05cbd574502d0f59c331fef8ed"
TOKENIZER_COMMIT = "86b5e0934494bd15c9632b12f734a8a67f723594"


def _blob_name(content: bytes, lfs: bool) -> str:
    """What huggingface_hub names a blob: sha256 for LFS files, the git blob sha1 otherwise."""
    if lfs:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_to_cache(cache, repo_id: str, files: dict, commit: str) -> str:
    """Writes `files` ({name: bytes}) as a cached snapshot of `repo_id` at `commit`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        blob = _blob_name(content, lfs=name.endswith((".bin", ".safetensors")))
        (repo / "blobs" / blob).write_bytes(content)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    return str(snapshot)


@pytest.fixture(scope="module")
def golden_mlm():
    with open(os.path.join(ASSETS, "config.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(ASSETS, "golden.npz")) as z:
        state = {name: z["state." + name] for name in meta["state_dict_keys"]["mlm"]}
    return meta["hf_config"]["mlm"], state


def original_repo_files(golden_mlm) -> dict:
    """The released repo's layout: config.json + pytorch_model.bin (decoder tied to the
    embedding, as torch.save writes it), and no tokenizer."""
    torch = pytest.importorskip("torch")
    import io
    hf_config, state = golden_mlm
    tensors = {name: torch.from_numpy(value.copy()) for name, value in state.items()}
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return {"config.json": json.dumps(hf_config, indent=2).encode(),
            "pytorch_model.bin": buffer.getvalue()}


def tokenizer_json(vocab_size: int) -> bytes:
    """A small BERT WordPiece tokenizer (specials first) standing in for bert-base-uncased."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
    tokens += [f"word{i}" for i in range(vocab_size - len(tokens))]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)},
                                           unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer.to_str().encode()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_released_names_are_hub_names_and_local_folders_win(tmp_path, monkeypatch):
    assert all(is_hub_name(name) for name in RELEASED_REPOS)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mosaicml" / "mosaic-bert-base").mkdir(parents=True)
    assert not is_hub_name("mosaicml/mosaic-bert-base")  # an existing folder is read as one
    assert not is_hub_name("./some/folder") and not is_hub_name("/abs/path")


def test_from_torch_by_hub_name_reads_the_cache_offline(tmp_path, offline_cache, golden_mlm,
                                                        capsys):
    add_to_cache(offline_cache, "mosaicml/mosaic-bert-base", original_repo_files(golden_mlm),
                 COMMIT)
    vocab = tokenizer_json(96)
    add_to_cache(offline_cache, "google-bert/bert-base-uncased",
                 {"tokenizer.json": vocab, "vocab.txt": b"[PAD]\n[UNK]\n"}, TOKENIZER_COMMIT)
    out = tmp_path / "converted"
    assert main(["from-torch", "--src", "mosaicml/mosaic-bert-base", "--out", str(out)]) == 0
    hf_config, state = golden_mlm
    want = torch_state_dict_to_flax(state, config_from_hf_json(hf_config))
    got, config = load_pretrained(str(out))
    assert config.vocab_size == 96 and config.num_attention_heads == 6
    embedding = got["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert np.abs(embedding).max() > 0.05  # the golden weights, not an init
    np.testing.assert_array_equal(embedding,
                                  want["bert"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(got["cls"]["decoder_bias"], want["cls"]["decoder_bias"])
    assert (out / "tokenizer.json").read_bytes() == vocab  # the tokenizer came along
    assert (out / "vocab.txt").is_file()


def test_old_tokenizer_name_in_the_cache_is_found(tmp_path, offline_cache, golden_mlm):
    add_to_cache(offline_cache, "mosaicml/mosaic-bert-base-seqlen-1024",
                 original_repo_files(golden_mlm), COMMIT)
    vocab = tokenizer_json(96)
    add_to_cache(offline_cache, "bert-base-uncased", {"tokenizer.json": vocab},
                 TOKENIZER_COMMIT)
    out = tmp_path / "converted"
    assert main(["from-torch", "--src", "mosaicml/mosaic-bert-base-seqlen-1024",
                 "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == vocab


def test_offline_and_not_cached_names_the_cache_and_the_command(tmp_path, offline_cache,
                                                                capsys):
    out = tmp_path / "converted"
    assert main(["from-torch", "--src", "mosaicml/mosaic-bert-base-seqlen-512",
                 "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert str(offline_cache) in message and "HF_HUB_OFFLINE" in message
    assert "hf download mosaicml/mosaic-bert-base-seqlen-512 config.json pytorch_model.bin" \
        in message
    assert not out.exists()


def test_offline_without_the_tokenizer_says_which_files_and_where(tmp_path, offline_cache,
                                                                  golden_mlm, capsys):
    add_to_cache(offline_cache, "mosaicml/mosaic-bert-base", original_repo_files(golden_mlm),
                 COMMIT)
    assert main(["from-torch", "--src", "mosaicml/mosaic-bert-base",
                 "--out", str(tmp_path / "converted")]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "bert-base-uncased" in message and str(offline_cache) in message
    assert "tokenizer.json" in message and "vocab.txt" in message
    assert "models--google-bert--bert-base-uncased" in message


def test_init_from_takes_a_hub_name(tmp_path, offline_cache, golden_mlm):
    """--config.init_from=mosaicml/mosaic-bert-base: the released weights, read from the cache."""
    from mosaicbert_jax.model import MosaicBertForMaskedLM
    from mosaicbert_jax.optim import recipe_optimizer
    from mosaicbert_jax.sharding import make_mesh
    from mosaicbert_jax.training.defaults import get_default_config
    from mosaicbert_jax.training.init_from import apply_init_from
    from mosaicbert_jax.training.step import init_state
    import jax
    add_to_cache(offline_cache, "mosaicml/mosaic-bert-base", original_repo_files(golden_mlm),
                 COMMIT)
    vocab = tokenizer_json(96)
    snapshot = add_to_cache(offline_cache, "google-bert/bert-base-uncased",
                            {"tokenizer.json": vocab}, TOKENIZER_COMMIT)
    hf_config, state_dict = golden_mlm
    config = config_from_hf_json(hf_config)
    _, tx = recipe_optimizer(get_default_config().optimizer, 10)
    state, _ = init_state(MosaicBertForMaskedLM(config), tx, 0,
                          make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
    reports = []
    started = apply_init_from("mosaicml/mosaic-bert-base", state, 0, config,
                              os.path.join(snapshot, "tokenizer.json"), reports.append)
    want = torch_state_dict_to_flax(state_dict, config)
    for (path, expected), got in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                                     jax.tree_util.tree_leaves(jax.device_get(
                                         started["params"]))):
        np.testing.assert_array_equal(got, expected, err_msg=jax.tree_util.keystr(path))
    assert "same vocabulary (96 tokens), all 96 rows kept" in reports[0]
