from .autopadder import Autopadder
from .autoregressive import AutoregressiveWrapper, top_k, top_p
from .encoder_decoder import EncoderDecoder
from .recorder import Recorder

__all__ = ['Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'top_k', 'top_p']
