"""Compatibility with the seed packages: their checkpoints load into our models."""

from .seed_weights import convert_seed_state_dict, from_seed_state_dict, load_seed_state_dict, save_converted

__all__ = ['convert_seed_state_dict', 'from_seed_state_dict', 'load_seed_state_dict', 'save_converted']
