"""Test helpers: the tiny random models of `mi_prun.models.tiny`, under the names the tests use.

The library itself builds `tiny-<family>` models from `mi_prun.models.tiny` (their configs are in
the family table); this module only gathers what tests and benchmarks import.
"""

from mi_prun.models.tiny import FAMILIES, VOCAB, byte_tokenizer, tiny_config, tiny_model

__all__ = ["FAMILIES", "VOCAB", "byte_tokenizer", "tiny_config", "tiny_model"]
