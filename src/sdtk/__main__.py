"""`python -m sdtk` and the `sdtk` command: a Ctrl-C while the CLI is still importing (typer,
rich, numpy: most of start-up) is one line and exit 130 too, not a traceback.

During the imports the interrupt is only noted, and acted on once they are done: raised inside
an extension module's initialisation (numpy's), a KeyboardInterrupt is printed as a traceback
or turned into an ImportError by the C code it lands in."""
import sys


def _interrupted() -> None:
    sys.stderr.write("sdtk: interrupted; nothing was written\n")
    sys.exit(130)


def run() -> None:
    try:
        import signal

        seen = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        try:
            from sdtk.cli.main import main
        finally:
            signal.signal(signal.SIGINT, previous)
    except KeyboardInterrupt:
        _interrupted()
    if seen:
        _interrupted()
    main()


if __name__ == "__main__":
    run()
