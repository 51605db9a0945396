from .builder import build_pos_emb, build_transformer
from .transformer_lm import TransformerLM

__all__ = ['TransformerLM', 'build_transformer', 'build_pos_emb']
