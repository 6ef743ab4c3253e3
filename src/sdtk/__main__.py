"""`python -m sdtk` and the `sdtk` command: a Ctrl-C while the CLI is still importing (typer,
rich, numpy: most of start-up) is one line and exit 130 too, not a traceback."""
import sys


def run() -> None:
    try:
        from sdtk.cli.main import main
    except KeyboardInterrupt:
        sys.stderr.write("sdtk: interrupted; nothing was written\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
