"""Subcommands of the `compress` CLI; see compress/cli.py for the contract."""
