"""The `compress` command line: one subcommand per module in `compress.commands`.

Each command module exposes `register(subparsers)` (adds its parser and sets `func`) and keeps its
own imports lazy so that `compress --help` stays fast. This file only dispatches and turns
`UserError` into a one-line message with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from compress.errors import UserError

# Module names under compress.commands, in the order `compress --help` lists them.
COMMANDS = ("finetune", "prune", "distill", "latency_table", "token_prune", "eval", "serve", "fetch")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message (it already does) on bad flags."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description="Prune transformers after training and serve the result.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"compress.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"compress.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as err:
        print(f"compress {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"compress {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
