"""`python -m routeformer ...` (and `torchrun -m routeformer ...`): the command line."""

from .cli import main

raise SystemExit(main())
