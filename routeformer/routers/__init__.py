from .base import KeyHistory, RouteInput, Router, RouterCache, apply_statistics, discard_statistics
from .causal_topk import CausalKeyRouter, CausalQueryRouter
from .dsa import DSARouter
from .full import FullRouter
from .kmeans import KMeansRouter
from .local import LocalRouter
from .lsh import LSHRouter
from .moba import MoBARouter
from .mosa import MoSARouter
from .sinkhorn import SinkhornRouter
from .topk import CoordinateDescentRouter, TopKRouter

# name -> class, for configuration files and the command line
ROUTERS = dict(full=FullRouter, local=LocalRouter, kmeans=KMeansRouter, lsh=LSHRouter, sinkhorn=SinkhornRouter,
               topk=TopKRouter, moba=MoBARouter, dsa=DSARouter, mosa=MoSARouter)

__all__ = ['ROUTERS', 'CausalKeyRouter', 'CausalQueryRouter', 'CoordinateDescentRouter', 'DSARouter', 'FullRouter',
           'KMeansRouter', 'KeyHistory', 'LSHRouter', 'LocalRouter', 'MoBARouter', 'MoSARouter', 'RouteInput', 'Router',
           'RouterCache', 'SinkhornRouter', 'TopKRouter', 'apply_statistics', 'discard_statistics']
