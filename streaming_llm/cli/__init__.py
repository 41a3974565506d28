"""The ``streaming-llm`` command: a thin dispatcher over one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from . import bench, chat, eval, generate, ingest, serve

COMMANDS = (generate, chat, ingest, eval, bench, serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="streaming-llm",
        description="Run a causal LM forever in constant memory: attention sinks + a rolling KV window "
        "(StreamingLLM). Offline; the default model is the embedded SmolLM2-135M-Instruct.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
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
