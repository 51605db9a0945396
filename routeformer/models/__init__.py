from .builder import build_pos_emb, build_transformer
from .transformer_lm import TransformerEncDec, TransformerLM

__all__ = ['TransformerEncDec', 'TransformerLM', 'build_transformer', 'build_pos_emb']
