"""The `streamer` command: subcommands, and the one place errors become a one-line message."""
from __future__ import annotations

import argparse
import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    from .errors import StreamerError

    batch, budget, demo, download, generate_cli, split, verify = (importlib.import_module(f"streamer.{m}") for m in (
        "batch", "budget", "demo", "download", "generate_cli", "split", "verify"))
    info = argparse.Namespace(setup_arg_parser=verify.setup_info_parser, main=verify.info_main)

    parser = argparse.ArgumentParser(prog="streamer", description="Run Llama 3 block by block from disk.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "split": (split, "shard a Meta checkpoint into one file per block"),
        "download": (download, "fetch a checkpoint from the Hugging Face Hub and split it"),
        "generate": (generate_cli, "generate text from a split model"),
        "batch": (batch, "run a JSONL file of prompts, many per pass over the weights"),
        "plan": (budget, "predict peak memory, resident blocks and the disk floor for a memory budget"),
        "verify": (verify, "check a split model's files against its manifest"),
        "info": (info, "show a split model's shape, dtype and sizes"),
        "demo": (demo, "make a small random model, split it and generate from it"),
    }
    for name, (module, help_text) in commands.items():
        module.setup_arg_parser(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return commands[args.command][0].main(args)
    except StreamerError as e:
        print(f"streamer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk or permission problem nobody anticipated: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"streamer {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"streamer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
