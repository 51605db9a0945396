from .base import Router
from .full import FullRouter
from .kmeans import KMeansRouter
from .local import LocalRouter
from .sinkhorn import SinkhornRouter

# name -> class, for configuration files and the command line
ROUTERS = dict(full=FullRouter, local=LocalRouter)
ROUTERS['kmeans'] = KMeansRouter

__all__ = ['Router', 'FullRouter', 'LocalRouter', 'ROUTERS']
__all__ += ['KMeansRouter']
ROUTERS['sinkhorn'] = SinkhornRouter
__all__ += ['SinkhornRouter']
from .topk import CoordinateDescentRouter, TopKRouter  # noqa: E402
ROUTERS['topk'] = TopKRouter
__all__ += ['CoordinateDescentRouter', 'TopKRouter']
from .lsh import LSHRouter  # noqa: E402
ROUTERS['lsh'] = LSHRouter
__all__ += ['LSHRouter']
