"""The `streamer` command: subcommands, and the one place errors become a one-line message."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS = {  # name: (module, function prefix, help)
    "split": ("split", "", "shard a Meta or Hugging Face checkpoint into one file per block"),
    "download": ("download", "", "fetch a checkpoint from the Hugging Face Hub and split it"),
    "generate": ("generate_cli", "", "generate text from a split model"),
    "batch": ("batch", "", "run a JSONL file of prompts, many per pass over the weights"),
    "plan": ("budget", "", "predict peak memory, resident blocks and the disk floor for a memory budget"),
    "verify": ("verify", "", "check a split model's files against its manifest"),
    "info": ("verify", "info_", "show a split model's shape, dtype and sizes"),
    "demo": ("demo", "", "split the small trained model that ships with streamer and stream a story from it"),
    "memcap": ("memcap", "", "run a command in a memory cgroup of the given size, then report its peak"),
}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the flag as the user typed it."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[-1] + ": ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def package_version() -> str:
    try:
        return version("streamer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> tuple[Parser, dict]:
    parser = Parser(prog="streamer", description="Run Llama models block by block from disk, in little memory.")
    parser.add_argument("--version", action="version", version=f"streamer {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    handlers = {}
    for name, (module_name, prefix, help_text) in COMMANDS.items():
        module = importlib.import_module(f"streamer.{module_name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"setup_{prefix}arg_parser")(p)
        flags = {a.dest: a.option_strings[-1] for a in p._actions if a.option_strings}  # parameter -> flag as typed
        handlers[name] = (getattr(module, f"{prefix}main"), flags)
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    from .errors import StreamerError

    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"streamer {args.command}: %(message)s", stream=sys.stderr)
    logging.getLogger("streamer").setLevel(logging.INFO)  # the library's messages; it never prints
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings would bury our one line
    run, flags = handlers[args.command]
    try:
        return run(args)
    except StreamerError as e:
        message = f"{flags[e.param]} {e.detail}" if e.param in flags else str(e)
        print(f"streamer {args.command}: error: {message}", file=sys.stderr)
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
