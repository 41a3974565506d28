"""The ``streaming-llm`` command: a thin dispatcher over one module per subcommand.

Nothing here imports torch or transformers: ``--help`` and ``--version`` answer at once, and each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, chat, eval, generate, ingest, serve

COMMANDS = (generate, chat, ingest, eval, bench, serve)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends every option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser uses :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="streaming-llm",
        description="Run a causal LM forever in constant memory: attention sinks + a rolling KV window "
        "(StreamingLLM). Offline; the default model is the embedded SmolLM2-135M-Instruct.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
