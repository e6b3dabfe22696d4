"""The open_lm model: args and presets, layers, LM head with loss, checkpoint I/O."""

from t2i_ds.model.args import ModelArgs, model_preset, PRESETS
from t2i_ds.model.head import LMHead, LossOutput
from t2i_ds.model.transformer import Transformer, build_model, count_parameters

__all__ = ["ModelArgs", "model_preset", "PRESETS", "LMHead", "LossOutput", "Transformer", "build_model", "count_parameters"]
