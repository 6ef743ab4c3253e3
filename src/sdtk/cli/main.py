"""`sdtk` entry point: registers each command module and turns errors into one-line messages.

Start-up: a command's module (and what it imports) is loaded only when that command runs, so
`sdtk inspect` never pays for convert's or merge's imports (`--help` loads them all)."""
from __future__ import annotations

import importlib
import signal
import sys
import threading
from typing import Dict, List, Optional

import typer
from typer.core import TyperGroup

from sdtk import fileio
from sdtk.version import __version__
from sdtk.cli import light_params
from sdtk.cli.common import error_line
from sdtk.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, SdtkError

# command name -> module under sdtk.cli that registers it (one module may register several), in
# the order `sdtk --help` lists them.
COMMAND_MODULES: Dict[str, str] = {
    "demo": "demo", "inspect": "inspect", "scan": "scan", "convert": "convert", "hash": "hash",
    "merge": "merge", "diff": "merge", "library": "library",
    "lora": "lora", "embedding": "embedding", "serve": "serve", "batch": "batch",
}


def _load_commands(module_name: str) -> dict:
    """The click commands one `sdtk.cli.<module>` registers, built on a scratch Typer app."""
    scratch = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    importlib.import_module(f"sdtk.cli.{module_name}").register(scratch)
    return dict(typer.main.get_group(scratch).commands)


class LazyGroup(TyperGroup):
    """The root group: commands named in COMMAND_MODULES, each module imported on first use."""

    def list_commands(self, ctx) -> List[str]:
        return list(dict.fromkeys([*COMMAND_MODULES, *self.commands]))

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            for name, command in _load_commands(COMMAND_MODULES[cmd_name]).items():
                self.commands.setdefault(name, command)
        return self.commands.get(cmd_name)


app = typer.Typer(
    cls=LazyGroup,
    name="sdtk",
    help="The Stable Diffusion model toolkit: inspect, scan, convert, hash, merge and index model files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        from sdtk import crc, fastcast

        print(f"sdtk {__version__}")
        print(f"  fp16 casts: {fastcast.status()}; CRC32: {crc.IMPLEMENTATION}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit.")):
    """sdtk: never executes a model file, never loads a whole model into memory, never loses a file."""


def register_all(target: typer.Typer) -> None:
    """Register every command on `target` (for callers that want a plain, fully built Typer app)."""
    for module_name in dict.fromkeys(COMMAND_MODULES.values()):
        importlib.import_module(f"sdtk.cli.{module_name}").register(target)


def main(argv: Optional[List[str]] = None) -> None:
    light_params.install()
    try:
        command = typer.main.get_command(app)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, fileio.note_interrupt)
        result = command.main(args=argv, prog_name="sdtk", standalone_mode=False)
    except SdtkError as e:
        error_line(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted; nothing was written")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # typer's own control flow; typer vendors click, so match by duck type
        if isinstance(e, typer.Exit) or type(e).__name__ == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if isinstance(e, typer.Abort) or type(e).__name__ == "Abort":
            error_line("interrupted; nothing was written")
            sys.exit(EXIT_INTERRUPTED)
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's UsageError / BadParameter
            e.show()
            sys.exit(EXIT_BAD_INPUT)
        if fileio.interrupted.is_set():  # an interrupt that surfaced as another error (see fileio)
            error_line("interrupted; nothing was written")
            sys.exit(EXIT_INTERRUPTED)
        raise
    if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a return value of 130
        error_line("interrupted; nothing was written")
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
