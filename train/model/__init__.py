"""The DSA model: surgery (dense -> DSA), indexer, attention modes, Hugging Face import/export."""

from train.model.attention import AttentionMode, AttentionStats
from train.model.surgery import ModelConfig, build_model, convert_to_dsa
from train.model.transformer import DSAForCausalLM

__all__ = ["AttentionMode", "AttentionStats", "DSAForCausalLM", "ModelConfig", "build_model", "convert_to_dsa"]
