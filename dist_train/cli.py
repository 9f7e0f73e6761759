"""`dist-train` command line: one subcommand per module, imported only when used.

Each subcommand's module owns its arguments and exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dist_train.synth", "generate a synthetic pose-distortion shard set (with oracle)"),
    "pack": ("dist_train.pack", "convert .npz / .npy arrays into a shard set"),
    "inspect": ("dist_train.inspect_cmd", "data-quality report of a shard set"),
    "extract": ("dist_train.extract", "InsightFace images/videos -> shard set"),
    "train": ("dist_train.loop", "train the frontalizer (single process or under accelerate launch)"),
    "eval": ("dist_train.evaluate", "metrics of a checkpoint on a shard set split"),
    "probe": ("dist_train.probe", "linear probe (closed-form ridge) of a shard set: the figure a model must beat"),
    "report": ("dist_train.report", "read training curves, plot them and diagnose what to change next"),
    "export": ("dist_train.export", "checkpoint -> consolidated fp32 file and ONNX, with parity check"),
    "frontalize": ("dist_train.frontalize", "apply a trained model to .npz arrays or to the faces in photos"),
}


def spelled_as_parser(parser, argv: list[str]) -> list[str]:
    """``argv`` with each ``--foo-bar`` / ``--foo_bar`` in the spelling ``parser`` knows: every command takes both."""
    known = set(parser._option_string_actions)
    out = []
    for i, token in enumerate(argv):
        if token == "--":  # what follows is not an option
            return out + argv[i:]
        name, eq, value = token.partition("=")
        if token.startswith("--") and name not in known:
            other = "--" + (name[2:].replace("_", "-") if "_" in name else name[2:].replace("-", "_"))
            if other in known:
                token = other + eq + value
        out.append(token)
    return out


def parse_args(parser, argv: list[str]):
    """``parser.parse_args`` accepting both spellings of every option (``--help`` shows the parser's own)."""
    return parser.parse_args(spelled_as_parser(parser, argv))


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dist-train COMMAND [options]   (dist-train COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dist-train: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
