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
import os
import re
import sys
import tempfile

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
# What JAX's CUDA plugin (the gpu-compile extra) writes to stderr at every import of JAX on a machine without
# a GPU, before any logging is set up; nothing a bat-jax user needs to see (no GPU is used then anyway).
CUDA_PLUGIN_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\n?"
    r"|I\d{4} [^\n]*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, "
    r"GPU will not be used\.\n?"
)

CUDA_PLUGIN_UNUSABLE = re.compile(
    r"Jax plugin configuration error: Exception when calling jax_plugins\.xla_cuda\d+\.initialize\(\)\n"
    r".*?RuntimeError: Unable to load CUDA\. Is it installed\?\n",
    re.DOTALL,
)


def import_jax_without_plugin_noise() -> None:
    """Import JAX and register its plugins with file descriptor 2 caught, then write back what they said but
    CUDA_PLUGIN_NOISE; only when JAX's CUDA plugin is installed (otherwise JAX stays unimported: `bat-jax
    --help` stays fast). JAX_PLATFORMS must be final by then: the plugin reads it as it registers."""
    from bat_jax.train.gpu_targets import cuda_plugin_installed

    if "jax" in sys.modules or not cuda_plugin_installed():
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import jax  # noqa: F401

            # the plugin speaks again when JAX registers it (otherwise at the first backend use)
            from jax._src import xla_bridge

            getattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            said = caught.read().decode(errors="replace")
            if "Could not find cuda drivers on your machine" in said:  # no GPU here: the plugin cannot load
                said = CUDA_PLUGIN_UNUSABLE.sub("", said)  # ... and JAX says so with a traceback
            sys.stderr.write(CUDA_PLUGIN_NOISE.sub("", said))


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
    if sys.argv[1:2] == ["compile-check"]:
        # the host backend, set before JAX starts (the CUDA plugin reads it): the chips are described only
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import_jax_without_plugin_noise()
    sys.exit(main())


if __name__ == "__main__":
    run()
