"""The `bat-jax` command line: one subcommand per job.

Each subcommand lives in its own module, which provides `add_parser(subparsers)` returning the
parser it added (with `func` set to the function that runs it: `func(args) -> int` exit status).
Modules are imported lazily so `bat-jax --help` stays fast. The console script is `run`: for the training
jobs it first re-executes the process with glibc malloc asking for transparent huge pages
(`bat_jax.train.hostmem`; `BAT_JAX_HOST_MALLOC=system` keeps the defaults), then calls `main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that defines add_parser(subparsers)
SUBCOMMANDS = {
    "prepare": "bat_jax.data.prepare.cli",
    "convert": "bat_jax.convert.cli",
    "verify": "bat_jax.data.verify",
    "pretrain": "bat_jax.train.cli",
    "probe": "bat_jax.probe.cli",
    "launch": "bat_jax.launch.cli",
    "compile-check": "bat_jax.train.compile_cli",
}


class Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line naming the flag, e.g.
    `bat-jax prepare: error: --clip-seconds: expected a finite number of seconds > 0, found inf` (rc 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bat-jax",
        description=(
            "BAT (Better Audio Transformer) and CGP (Convex Gated Probing) in JAX.\n\n"
            "Run `bat-jax SUBCOMMAND --help` for what each subcommand reads and writes."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from bat_jax import __version__

    parser.add_argument("--version", action="version", version=f"bat-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=Parser)
    sub.required = True
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Subcommands that set config_overrides (pretrain) take the --config.a.b=v flags argparse leaves.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(args.func(args) or 0)


# subcommands whose process re-executes itself with bat_jax.train.hostmem's malloc tunables first
HOST_MALLOC_TUNED = ("pretrain", "probe")


def run() -> None:
    """The `bat-jax` console script (and `python -m bat_jax.cli`): `main` on sys.argv, after
    `hostmem.maybe_reexec` for the subcommands in HOST_MALLOC_TUNED."""
    if sys.argv[1:2] and sys.argv[1] in HOST_MALLOC_TUNED:
        from bat_jax.train import hostmem

        try:
            hostmem.maybe_reexec()
        except ValueError as err:  # a bad BAT_JAX_HOST_MALLOC: one line, as the config errors (exit 2)
            print(f"bat-jax {sys.argv[1]}: {err}", file=sys.stderr)
            sys.exit(2)
    sys.exit(main())


if __name__ == "__main__":
    run()
