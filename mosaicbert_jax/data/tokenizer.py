"""BERT WordPiece tokenizers: load bert-base-uncased (file, dir or hub) or train one offline."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
from typing import Iterable

from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the five BERT special tokens; [PAD] is always 0 (the model's pad id)."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "SpecialTokens":
        ids = {}
        for name, token in zip(("pad", "unk", "cls", "sep", "mask"), SPECIAL_TOKENS):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer has no {token} token; use a BERT WordPiece vocabulary "
                                 f"that defines all of {SPECIAL_TOKENS}")
            ids[name] = token_id
        if ids["pad"] != 0:
            raise ValueError(f"[PAD] has id {ids['pad']}, but the model pads with id 0; put [PAD] "
                             f"first in the vocabulary")
        return cls(**ids)

    @classmethod
    def from_dict(cls, ids: dict) -> "SpecialTokens":
        return cls(**{name: int(ids[name]) for name in ("pad", "unk", "cls", "sep", "mask")})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def ids(self) -> tuple:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """The [PAD]/[UNK]/[CLS]/[SEP]/[MASK] ids of `tokenizer` (raises if one is missing)."""
    return SpecialTokens.from_tokenizer(tokenizer)


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """`n` rounded up to a multiple of `multiple` (30522 -> 30528), for fast embedding matmuls."""
    if n <= 0 or multiple <= 0:
        raise ValueError(f"vocab size {n} and multiple {multiple} must be positive")
    return -(-n // multiple) * multiple


def _add_bert_pipeline(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    """Sets BERT's normalizer, pre-tokenizer, [CLS]/[SEP] template and WordPiece decoder."""
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return _add_bert_template(tokenizer)


def _add_bert_template(tokenizer: Tokenizer) -> Tokenizer:
    """[CLS] A [SEP] for single texts and [CLS] A [SEP] B [SEP] (type ids 0/1) for pairs."""
    ids = special_tokens(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids.cls), ("[SEP]", ids.sep)])
    return tokenizer


def _from_vocab_txt(path: str, lowercase: bool) -> Tokenizer:
    vocab = models.WordPiece.read_file(path)
    if "[UNK]" not in vocab:
        raise ValueError(f"vocab file {path} has no [UNK] token; is it a BERT WordPiece vocab.txt?")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    return _add_bert_pipeline(tokenizer, lowercase)


def _from_json(path: str) -> Tokenizer:
    tokenizer = Tokenizer.from_file(path)
    special_tokens(tokenizer)  # validates the five special tokens and [PAD] = 0
    if tokenizer.post_processor is None:
        _add_bert_template(tokenizer)
    return tokenizer


def _hub_endpoint_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _from_hub(name: str) -> Tokenizer:
    offline_help = (f"pass a local path instead: a tokenizer.json or vocab.txt file, or a "
                    f"directory holding one (for {name!r}, download its tokenizer.json on a "
                    f"machine that is online)")
    try:  # the local Hugging Face cache works offline
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "tokenizer.json")
        if isinstance(cached, str):
            return _from_json(cached)
    except ImportError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not _hub_endpoint_reachable():
        raise ValueError(f"tokenizer {name!r}: no such local file or directory, and the Hugging "
                         f"Face hub is unreachable (offline); {offline_help}")
    try:
        tokenizer = Tokenizer.from_pretrained(name)
    except Exception as error:  # network, auth or missing-repo errors all mean the same to callers
        raise ValueError(f"could not load tokenizer {name!r} from the Hugging Face hub ({error}); "
                         f"{offline_help}") from error
    special_tokens(tokenizer)
    return tokenizer


def load_tokenizer(path_or_name: str, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer from tokenizer.json, vocab.txt, a directory holding one, or a
    hub name such as "bert-base-uncased" (hub only when online or cached).

    The result encodes single texts as [CLS] a [SEP] and pairs as [CLS] a [SEP] b [SEP] with
    type ids 0/1. `lowercase` applies to vocab.txt files (tokenizer.json brings its own normalizer).
    """
    path = os.path.expanduser(str(path_or_name))
    if os.path.isdir(path):
        for file_name, loader in (("tokenizer.json", _from_json), ("vocab.txt", None)):
            candidate = os.path.join(path, file_name)
            if os.path.isfile(candidate):
                return loader(candidate) if loader else _from_vocab_txt(candidate, lowercase)
        raise ValueError(f"tokenizer directory {path} holds neither tokenizer.json nor vocab.txt")
    if os.path.isfile(path):
        return _from_json(path) if path.endswith(".json") else _from_vocab_txt(path, lowercase)
    if not _HUB_NAME.match(path) or path.endswith((".json", ".txt")):
        raise ValueError(f"tokenizer path {path_or_name!r} does not exist; pass an existing "
                         f"tokenizer.json, vocab.txt, or a directory holding one")
    return _from_hub(path)


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """Trains a BERT-style WordPiece vocabulary (specials first, [PAD] = 0) on `texts`, offline.

    Deterministic: the tokenizers trainer numbers "##" pieces in hash-map order, which changes
    tie-breaks between runs (huggingface/tokenizers#1794), so every "##c" piece of the corpus's
    alphabet is numbered up front, in sorted order. `texts` is read twice (a generator is
    materialised). The vocabulary can come out smaller than `vocab_size` on a small corpus (or
    larger, if the corpus's alphabet alone needs more pieces).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least "
                         f"{len(SPECIAL_TOKENS) + 100}")
    texts = texts if isinstance(texts, (list, tuple)) else list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    alphabet = set()
    for text in texts:
        alphabet.update(normalizer.normalize_str(text))
    continuing = sorted("##" + c for c in alphabet if not c.isspace())
    trainee = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    trainee.normalizer = normalizer
    trainee.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + len(continuing)),
        min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS) + continuing,
        show_progress=False)
    trainee.train_from_iterator(texts, trainer)
    # Rebuild from the learned vocabulary so that only the five BERT tokens are special.
    tokenizer = Tokenizer(models.WordPiece(trainee.get_vocab(), unk_token="[UNK]",
                                           max_input_chars_per_word=100))
    return _add_bert_pipeline(tokenizer, lowercase)


def tokenizer_vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (model vocab plus added tokens)."""
    return tokenizer.get_vocab_size(with_added_tokens=True)

