"""Released MosaicBERT checkpoints by hub name: `convert from-torch --src mosaicml/mosaic-bert-base`.

A `--src` that is not a local folder but looks like `org/name` is resolved through
huggingface_hub's cache (`snapshot_download`; with HF_HUB_OFFLINE=1 only the cache is read).
The released repos hold no tokenizer: they use bert-base-uncased's, which is fetched (or read
from the cache) alongside. The result is a temporary local folder of symlinks into the cache
(removed at exit) holding config.json, the weights and the tokenizer files, which every folder
reader accepts.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from typing import Optional

from mosaicbert_jax.checkpoint import TOKENIZER_FILES
from mosaicbert_jax.param_layout import CONFIG_FILE, TORCH_WEIGHT_FILES

# The MosaicBERT family mosaicml released on the hub (collection "mosaicml/mosaicbert", April
# 2023): each repo holds config.json and pytorch_model.bin plus the original's remote code, and
# no tokenizer; the model cards name bert-base-uncased as the tokenizer. No mosaic-bert-large
# was released.
RELEASED_REPOS = ("mosaicml/mosaic-bert-base", "mosaicml/mosaic-bert-base-seqlen-256",
                  "mosaicml/mosaic-bert-base-seqlen-512", "mosaicml/mosaic-bert-base-seqlen-1024",
                  "mosaicml/mosaic-bert-base-seqlen-2048")
RELEASED_TOKENIZER = "bert-base-uncased"
# bert-base-uncased now lives at google-bert/bert-base-uncased; the old name redirects, and a
# cache may hold either.
_TOKENIZER_REPOS = {RELEASED_TOKENIZER: ("google-bert/bert-base-uncased", "bert-base-uncased")}
_TOKENIZER_FETCH = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = ("1", "true", "yes", "on")


def is_hub_name(src: str) -> bool:
    """True for `org/name` that is not an existing local path (a folder wins over a name)."""
    return not os.path.exists(os.path.expanduser(src)) and bool(_HUB_NAME.match(src))


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def tokenizer_repo_for(repo_id: str) -> Optional[str]:
    """The tokenizer a released repo uses (its model card's), or None for other repos."""
    return RELEASED_TOKENIZER if repo_id in RELEASED_REPOS else None


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("resolving a hub name needs huggingface_hub: pip install "
                          "'mosaicbert-jax[hf]' (or pass a local folder)") from error
    return huggingface_hub


def _download_command(repo_id: str, files: tuple[str, ...], cache: str) -> str:
    return f"hf download {repo_id} {' '.join(files)} --cache-dir {cache}"


def _model_snapshot(repo_id: str, cache: str) -> str:
    """The cached (or freshly downloaded) snapshot folder of `repo_id` with config + weights."""
    hub = _import_hub()
    wanted = (CONFIG_FILE,) + tuple(TORCH_WEIGHT_FILES) + TOKENIZER_FILES
    fetch = (CONFIG_FILE, "pytorch_model.bin")
    try:
        folder = hub.snapshot_download(repo_id, cache_dir=cache, local_files_only=hub_offline(),
                                       allow_patterns=list(wanted))
    except Exception as error:  # offline miss, network, auth or missing repo: one message
        where = (f"is not in the Hugging Face cache {cache} (HF_HUB_OFFLINE is set, so nothing is "
                 f"downloaded)" if hub_offline() else
                 f"could not be downloaded into the Hugging Face cache {cache} "
                 f"({type(error).__name__})")
        raise ValueError(f"--src {repo_id!r} is not a local folder and {where}; on a machine "
                         f"with network run `{_download_command(repo_id, fetch, cache)}` "
                         f"and copy that cache here (or pass a local folder)") from error
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)) or not any(
            os.path.isfile(os.path.join(folder, name)) for name in TORCH_WEIGHT_FILES):
        raise ValueError(f"the cached snapshot {folder} of {repo_id!r} lacks {CONFIG_FILE} or "
                         f"one of {list(TORCH_WEIGHT_FILES)}; run "
                         f"`{_download_command(repo_id, fetch, cache)}`")
    return folder


def _cached_tokenizer_files(tokenizer: str, cache: str) -> list[str]:
    """The tokenizer files of `tokenizer` (under any of its repo names) found in the cache."""
    hub = _import_hub()
    for repo_id in _TOKENIZER_REPOS.get(tokenizer, (tokenizer,)):
        found = [hub.try_to_load_from_cache(repo_id, name, cache_dir=cache)
                 for name in _TOKENIZER_FETCH]
        found = [path for path in found if isinstance(path, str)]
        if found:
            return found
    return []


def _tokenizer_files(tokenizer: str, for_repo: str, cache: str) -> list[str]:
    """bert-base-uncased's tokenizer files: from the cache, or downloaded when online."""
    found = _cached_tokenizer_files(tokenizer, cache)
    if found:
        return found
    repo_id = _TOKENIZER_REPOS.get(tokenizer, (tokenizer,))[0]
    command = _download_command(repo_id, _TOKENIZER_FETCH, cache)
    if hub_offline():
        raise ValueError(f"{for_repo} uses the {tokenizer} tokenizer, which is not in the cache "
                         f"{cache} (HF_HUB_OFFLINE is set); on a machine with network run "
                         f"`{command}` (it puts {', '.join(_TOKENIZER_FETCH)} under {cache}/"
                         f"models--{repo_id.replace('/', '--')}/snapshots/) and copy it here")
    hub = _import_hub()
    try:
        return [hub.hf_hub_download(repo_id, name, cache_dir=cache)
                for name in _TOKENIZER_FETCH[:2]]
    except Exception as error:
        raise ValueError(f"could not download the {tokenizer} tokenizer of {for_repo} "
                         f"({type(error).__name__}); run `{command}` on a machine with "
                         f"network and copy {cache} here") from error


def resolve_model_source(src: str) -> str:
    """A local folder to read `src` from: `src` itself, or for a hub name a folder of symlinks
    to its cached config.json, weights and tokenizer files."""
    if not is_hub_name(src):
        return src
    cache = hub_cache_dir()
    snapshot = _model_snapshot(src, cache)
    files = [os.path.join(snapshot, name) for name in (CONFIG_FILE, *TORCH_WEIGHT_FILES)]
    tokenizers = [os.path.join(snapshot, name) for name in TOKENIZER_FILES
                  if os.path.isfile(os.path.join(snapshot, name))]
    tokenizer = tokenizer_repo_for(src)
    if not tokenizers and tokenizer is not None:
        tokenizers = _tokenizer_files(tokenizer, src, cache)
    view = tempfile.mkdtemp(prefix="mosaicbert-hub-")
    atexit.register(shutil.rmtree, view, ignore_errors=True)  # only links; the cache stays
    for path in files + tokenizers:
        if os.path.isfile(path):
            os.symlink(os.path.realpath(path), os.path.join(view, os.path.basename(path)))
    return view


__all__ = ["RELEASED_REPOS", "RELEASED_TOKENIZER", "hub_cache_dir", "hub_offline",
           "is_hub_name", "resolve_model_source", "tokenizer_repo_for"]
