"""How a peer trains: one module a strategy (``sweep``, ``fedavg``) behind ``base.JobContext``.

Importing the package registers every strategy in ``base.STRATEGIES``: each module is imported
here by name, and the names must be the contract's.
"""

from __future__ import annotations

from typing import get_args

from swarmtrain.common.events import Strategy
from swarmtrain.peer.strategies import fedavg, sweep
from swarmtrain.peer.strategies.base import STRATEGIES, JobContext, ReportFn, with_retries

MODULES = (sweep, fedavg)
STRATEGIES.check_names(get_args(Strategy))

__all__ = ["MODULES", "STRATEGIES", "JobContext", "ReportFn", "with_retries"]
