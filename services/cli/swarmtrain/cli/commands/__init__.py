"""The ``swarmtrain`` commands that are not a process of the platform, one module a group: ``login``,
``peers``, ``datasets``, ``sessions`` (alias ``session``) talk to the REST API with the stored login;
``deadletters`` is an operator's, on the projector's database. Each module declares its flags beside
the handler they feed; ``cli/output.py`` prints for all of them. The processes (``up``, ``peer``,
``gateway`` …) and the commands that run the training library start from ``cli/main.py``."""

from __future__ import annotations

from swarmtrain.cli.commands import datasets, deadletters, login, peers, sessions
from swarmtrain.cli.commands.base import Group


def register(sub: Group) -> Group:
    """Add every group to the ``swarmtrain`` parser; returns the ``sessions`` group's subcommands."""
    login.register(sub)
    peers.register(sub)
    datasets.register(sub)
    group = sessions.register(sub)
    deadletters.register(sub)
    return group
