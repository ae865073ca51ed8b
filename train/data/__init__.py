"""Data: sources on `datasets`, tokenisation, packing, rank sharding, resumable state, the synthetic default."""

from train.data.pipeline import DataConfig, TokenPipeline, check_tokenizer_fits, ensure_generated, load_tokenizer
from train.data.sources import DataError, SourceConfig
from train.data.synthetic import SyntheticConfig

__all__ = ["DataConfig", "DataError", "SourceConfig", "SyntheticConfig", "TokenPipeline", "check_tokenizer_fits",
           "ensure_generated", "load_tokenizer"]
