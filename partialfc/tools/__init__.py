"""Command-line tools: ``python -m partialfc.tools.<name> --help``.

Dataset tools: ``im2rec`` (image folder or .lst -> insightface .rec), ``shuffle_rec`` (indexed .rec ->
shuffled sequential .rec), ``make_bin`` (pairs list -> verification .bin); the top-level
``unpack_glint360k.py`` unpacks .rec datasets into identity folders.

Every tool reports bad input (a missing or unusable file, a wrong network name or size) as one
``error: ...`` line on stderr naming it, with exit status 1; other exceptions are bugs and keep their
traceback. argparse's own usage errors exit with status 2.
"""

EXIT_BAD_INPUT = 1


class ToolError(Exception):
    """Bad input to a command-line tool; ``run_cli`` prints it and exits with status 1."""


def bad_input_errors():
    """The exception types that mean bad input (or a file system that cannot be written), not a bug."""
    from partialfc.data.datasets import DataError
    from partialfc.data.recordio import RecordIOError
    from partialfc.data.transforms import CorruptImageError
    from partialfc.eval.model_io import InputError
    from partialfc.eval.safe_pickle import UnsafePickleError

    # OSError: a missing or unreadable input, an output folder that cannot be written, a full disk
    return (ToolError, DataError, RecordIOError, CorruptImageError, InputError, UnsafePickleError, OSError)


def run_cli(main, argv=None):
    """Run ``main(argv)``; bad input (:func:`bad_input_errors`) becomes ``error: ...`` on stderr and exit
    status 1."""
    import sys

    try:
        return main(argv)
    except bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def read_text_lines(path, what):
    """The lines of the text file ``path`` (a list file, ``what`` says which); a ToolError naming it when it is
    missing, a folder or not text."""
    import os

    if not os.path.isfile(path):
        raise ToolError(f"{what} {path!r} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ToolError(f"{what} {path!r} is not a UTF-8 text file (byte {e.start}: {e.reason}); "
                        f"expected one entry per line") from None
