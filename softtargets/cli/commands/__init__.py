"""Subcommands of the ``softtargets`` CLI, one module each (see :mod:`softtargets.cli`)."""
