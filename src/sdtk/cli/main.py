"""`sdtk` entry point: registers each command module and turns errors into one-line messages."""
from __future__ import annotations

import signal
import sys
import threading
from typing import List, Optional

import typer

from sdtk import __version__, fileio
from sdtk.cli.common import error_line
from sdtk.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, SdtkError

app = typer.Typer(
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


# One module per command (or command group); each defines register(app).
from sdtk.cli import demo, scan, inspect, convert, hash, library, merge  # noqa: E402
from sdtk.cli import batch  # noqa: E402

for _module in (demo, inspect, scan, convert, hash, merge, library):
    _module.register(app)
batch.register(app)


def main(argv: Optional[List[str]] = None) -> None:
    command = typer.main.get_command(app)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, fileio.note_interrupt)
    try:
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
