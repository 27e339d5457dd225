"""Pieces of the MLM training job: state, steps, checkpoints, metrics, FLOP counting."""
