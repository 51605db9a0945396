from .backends import BACKENDS
from .executor import RoutedAttention
from .plan import RoutePlan, gather, scatter

__all__ = ['BACKENDS', 'RoutedAttention', 'RoutePlan', 'gather', 'scatter']
