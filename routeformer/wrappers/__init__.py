from .autopadder import Autopadder
from .autoregressive import AutoregressiveWrapper, TrainingWrapper, top_k, top_p
from .encoder_decoder import EncoderDecoder
from .recorder import Recorder

__all__ = ['Autopadder', 'AutoregressiveWrapper', 'EncoderDecoder', 'Recorder', 'TrainingWrapper', 'top_k', 'top_p']
