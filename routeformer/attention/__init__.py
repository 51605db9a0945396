from .backends import BACKENDS, Choice, explain_backends
from .executor import RoutedAttention, use_backend
from .plan import Dense, Gathered, RoutePlan, SelectedBlocks, SlidingWindow, SortedBand, gather, scatter

__all__ = ['BACKENDS', 'Choice', 'Dense', 'Gathered', 'RoutedAttention', 'RoutePlan', 'SelectedBlocks', 'SlidingWindow',
           'SortedBand', 'explain_backends', 'gather', 'scatter', 'use_backend']
