"""Subcommands of the stepscope CLI, one module each (see stepscope.cli)."""
