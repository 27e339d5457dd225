"""Export to and import from the PyTorch MosaicBERT layout, and the command line for both.

  python -m mosaicbert_jax.convert to-torch --checkpoint <path> --out <dir>
  python -m mosaicbert_jax.convert from-torch --src <dir> --out <dir>

The name and config mappings live in `mosaicbert_jax.param_layout`; reading and writing our own
checkpoints in `mosaicbert_jax.checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from etils import epath

from mosaicbert_jax import checkpoint, hub
from mosaicbert_jax.cli_errors import as_user_error, exit_status
from mosaicbert_jax.config import MosaicBertConfig
from mosaicbert_jax.param_layout import (CONFIG_FILE, TORCH_WEIGHT_FILES, Params, StateDict,
                                         config_from_hf_json, config_to_hf_json, describe_sizes,
                                         flax_to_torch_state_dict, infer_model_kind,
                                         read_torch_folder, torch_state_dict_to_flax,
                                         unwrap_variables, weights_dtype_name)

# The vocabulary sizes of bert-base-uncased's WordPiece tokenizer (30522) and the MosaicBERT
# releases' padding of it to a multiple of 64 (30528).
BERT_BASE_UNCASED_VOCAB_SIZES = (30522, 30528)


def export_torch_folder(out: str | os.PathLike, params: Params, config: MosaicBertConfig,
                        tokenizer_files: Sequence[str | os.PathLike] = ()) -> StateDict:
    """Writes config.json, model.safetensors and tokenizer files; returns the state dict."""
    from safetensors.numpy import save_file

    if config.attention_window:
        raise ValueError(f"this model attends within a sliding window (attention_window="
                         f"{config.attention_window}), which the PyTorch MosaicBERT format "
                         f"cannot express; its exported weights would compute something else")
    params = unwrap_variables(params)
    state_dict = flax_to_torch_state_dict(params, config)
    model_kind = infer_model_kind(params)
    directory = epath.Path(out)
    weights_file = directory / TORCH_WEIGHT_FILES[0]
    if weights_file.exists():
        raise ValueError(f"{weights_file} already exists; choose another output folder or "
                         f"delete it first")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, os.fspath(weights_file), metadata={"format": "pt"})
    _readable_like_other_files(weights_file)
    hf_config = config_to_hf_json(config, model_kind,
                                  torch_dtype=weights_dtype_name(state_dict))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    for tokenizer_file in tokenizer_files:
        checkpoint.copy_tokenizer_file(tokenizer_file, directory)
    return state_dict


def _readable_like_other_files(path: epath.Path) -> None:
    """safetensors writes its file 0600; give it the mode plain writes get (0644 under the
    usual umask 022), so others on a shared cluster can read the weights too."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.fspath(path), 0o666 & ~umask)


def missing_tokenizer_note(src: str, out: str, config: MosaicBertConfig) -> str:
    """What to say when an imported folder has no tokenizer: which one the model expects."""
    if config.vocab_size in BERT_BASE_UNCASED_VOCAB_SIZES:
        expected = ("bert-base-uncased's WordPiece tokenizer (the released MosaicBERT models' "
                    "tokenizer; vocab_size "
                    f"{config.vocab_size} is its 30522 tokens padded to a multiple of 64)")
    else:
        expected = f"the tokenizer it was trained with (vocab_size {config.vocab_size})"
    return (f"note: {src} has no tokenizer file ({', '.join(checkpoint.TOKENIZER_FILES)}); "
            f"the model expects {expected}. Put its tokenizer.json or vocab.txt in {out} for "
            f"fill_mask and GLUE to find it, or pass --tokenizer / --config.tokenizer")


def _to_torch(args: argparse.Namespace) -> None:
    params, config = checkpoint.load_pretrained(args.checkpoint)
    tokenizers = args.tokenizer or checkpoint.find_tokenizer_files(
        checkpoint.checkpoint_root(args.checkpoint))
    export_torch_folder(args.out, params, config, tokenizers)
    print(f"wrote {infer_model_kind(params)} model ({describe_sizes(config)}) to {args.out}")


def _from_torch(args: argparse.Namespace) -> None:
    args.src = hub.resolve_model_source(args.src)  # a hub name: its cached files (hub.py)
    state_dict, hf_config = read_torch_folder(args.src)
    config = config_from_hf_json(hf_config)
    params = torch_state_dict_to_flax(state_dict, config)
    tokenizers = checkpoint.find_tokenizer_files(args.src)
    checkpoint.save_pretrained(args.out, params, config)
    for tokenizer_file in tokenizers:
        checkpoint.copy_tokenizer_file(tokenizer_file, args.out)
    print(f"wrote {infer_model_kind(params)} model ({describe_sizes(config)}) to {args.out}"
          + (f" with {', '.join(t.name for t in tokenizers)}" if tokenizers else ""))
    if not tokenizers:
        print(missing_tokenizer_note(args.src, args.out, config), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mosaicbert_jax.convert",
        description="Convert MosaicBERT weights between this JAX port and the PyTorch layout.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_torch = commands.add_parser(
        "to-torch", help="JAX checkpoint -> Hugging Face style PyTorch folder",
        description="Write config.json, model.safetensors (reference parameter names) and "
                    "tokenizer files from a JAX checkpoint.")
    to_torch.add_argument("--checkpoint", required=True,
                          help="save_pretrained folder, training workdir, its checkpoints/ "
                               "folder (latest step) or one checkpoints/<step> folder")
    to_torch.add_argument("--out", required=True, help="output folder")
    to_torch.add_argument("--tokenizer", action="append", default=None,
                          help="tokenizer file to copy (repeatable); default: the tokenizer "
                               "files found next to the checkpoint")
    to_torch.set_defaults(run=_to_torch)
    from_torch = commands.add_parser(
        "from-torch", help="PyTorch folder (e.g. mosaicml/mosaic-bert-base) -> JAX folder",
        description="Read config.json + model.safetensors or pytorch_model.bin and write a "
                    "save_pretrained folder (config.json + Orbax params/).")
    from_torch.add_argument("--src", required=True,
                            help="folder with config.json and model.safetensors or "
                                 "pytorch_model.bin, or a hub name such as "
                                 "mosaicml/mosaic-bert-base (read through the HF cache)")
    from_torch.add_argument("--out", required=True, help="output folder (must not hold params/)")
    from_torch.set_defaults(run=_from_torch)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 on success; a user's mistake prints one `error:` line and gives 2 (see cli_errors)."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        with as_user_error(ImportError):  # torch or safetensors not installed
            args.run(args)

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
