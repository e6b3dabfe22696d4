"""t2i_ds: a DeepSpeed trainer for auto-regressive text-to-image models on open_lm language models."""

__version__ = "0.1.0"
