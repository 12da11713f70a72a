"""What the `python -m models` commands (and `python -m emulation personalize`) share: the corpus and
model flags, model configs, corpus loading, checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path

from contract.cli import UsageError


def common_flags() -> argparse.ArgumentParser:
    """The flags of every command that loads the corpus: model size, data directory, split, vocabulary."""
    from models.corpus import VOCABULARIES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", choices=["gboard", "tiny"], default="gboard",
                        help="model size (tiny: tests and quick runs)")
    common.add_argument("--data", default=None, help="data directory (default: ./data or $NIGHTJAR_DATA)")
    common.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out client split")
    common.add_argument("--vocabulary", choices=VOCABULARIES, default="public",
                        help="public: from public text (default); users: from the training users' text, "
                             "for comparison only")
    return common


def model_config(name: str):
    from models.model import CONFIGS

    return CONFIGS[name]


def load_corpus_for(args, config, vocabulary: str | None = None):
    from models.corpus import load_corpus

    return load_corpus(data_dir=args.data, vocab_size=config.vocab_size - 4,
                       seq_len=config.seq_len, seed=args.split_seed,
                       vocabulary=vocabulary or args.vocabulary)


def read_checkpoint(path: str, config):
    from models.model import weight_layout
    from contract.model.weights import load_checkpoint

    if not Path(path).is_file():
        raise UsageError(f"--checkpoint/--init: no file at {path}")
    layout, flat, _ = load_checkpoint(path)
    if layout != weight_layout(config):
        raise UsageError(f"{path}: its weights do not fit the '{config}' model config")
    return flat


def summary_table(name: str, initial: dict, final: dict) -> str:
    return (f"\n{name}\n{'':12}{'top-1':>8}{'top-3':>8}{'loss':>8}\n"
            f"{'initial':12}{initial['top1']:8.4f}{initial['top3']:8.4f}{initial['loss']:8.3f}\n"
            f"{'final':12}{final['top1']:8.4f}{final['top3']:8.4f}{final['loss']:8.3f}")


def add_dropout_flags(parser, placement: bool = True) -> None:
    """--dropout RATE and --dropout-placement (contract.model.dropout), shared by the training commands."""
    from contract.model.dropout import PLACEMENTS

    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout rate while training (0: none), Zaremba et al.'s placement")
    parser.set_defaults(dropout_placement=",".join(PLACEMENTS))
    if placement:
        parser.add_argument("--dropout-placement", default=",".join(PLACEMENTS),
                            help=f"where dropout applies, comma-separated among {', '.join(PLACEMENTS)}")


def dropout_from(args):
    """The Dropout of --dropout/--dropout-placement (None at rate 0), or a UsageError naming the flag."""
    from contract.model.dropout import parse

    try:
        return parse(args.dropout, args.dropout_placement)
    except ValueError as e:
        raise UsageError(str(e)) from None
