from .base import Router, discard_statistics
from .full import FullRouter
from .kmeans import KMeansRouter
from .local import LocalRouter
from .lsh import LSHRouter
from .sinkhorn import SinkhornRouter
from .topk import CoordinateDescentRouter, TopKRouter

# name -> class, for configuration files and the command line
ROUTERS = dict(full=FullRouter, local=LocalRouter, kmeans=KMeansRouter, lsh=LSHRouter, sinkhorn=SinkhornRouter,
               topk=TopKRouter)

__all__ = ['ROUTERS', 'CoordinateDescentRouter', 'FullRouter', 'KMeansRouter', 'LSHRouter', 'LocalRouter', 'Router',
           'SinkhornRouter', 'TopKRouter', 'discard_statistics']

from .mosa import MoSARouter  # noqa: E402

ROUTERS['mosa'] = MoSARouter
__all__ += ['MoSARouter']
