from .base import Router
from .full import FullRouter
from .local import LocalRouter

# name -> class, for configuration files and the command line
ROUTERS = dict(full=FullRouter, local=LocalRouter)

__all__ = ['Router', 'FullRouter', 'LocalRouter', 'ROUTERS']
