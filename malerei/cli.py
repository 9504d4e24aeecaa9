"""The ``malerei`` command. Each subcommand lives in ``malerei/commands/<name>.py`` with
``register(subparsers)`` (adds its parser, sets ``func``) so this file only lists them.

Heavy libraries are imported by the commands when they run, never here, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module names under malerei.commands, in the order `malerei --help` lists them.
COMMAND_MODULES = [
    "generate",
    "edit",
    "enlarge",
    "grid",
    "world",
    "train",
    "evaluate",
    "serve",
]


class OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (unknown command, bad number) as one ``error: ...`` line, exit 2.

    Subcommand parsers inherit the class, so every command gets it."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="malerei",
        description="Self-hosted Stable-Diffusion-style image generation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"malerei.commands.{name}").register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    from malerei.engine.errors import MalereiError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MalereiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`malerei info x.png | head`): not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
