"""The open_lm model: args and presets, layers, LM head with loss, checkpoint I/O.

The args load without torch (the train command checks a config before torch is imported); the torch parts are
imported on first use of their names.
"""

import importlib

from t2i_ds.model.args import ModelArgs, model_preset, PRESETS

_LAZY = {"LMHead": "head", "LossOutput": "head", "Transformer": "transformer", "build_model": "transformer",
         "count_parameters": "transformer"}

__all__ = ["ModelArgs", "model_preset", "PRESETS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"t2i_ds.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 't2i_ds.model' has no attribute {name!r}")
