"""Command-line tools: ``python -m partialfc.tools.<name> --help``.

Dataset tools: ``im2rec`` (image folder or .lst -> insightface .rec), ``shuffle_rec`` (indexed .rec ->
shuffled sequential .rec), ``make_bin`` (pairs list -> verification .bin); the top-level
``unpack_glint360k.py`` unpacks .rec datasets into identity folders.
"""


class ToolError(Exception):
    """Bad input to a command-line tool; ``run_cli`` prints it and exits with status 1."""


def run_cli(main, argv=None):
    """Run ``main(argv)``; a ToolError or a data error becomes ``error: ...`` on stderr and exit status 1."""
    import sys

    from partialfc.data.datasets import DataError
    from partialfc.data.recordio import RecordIOError
    from partialfc.data.transforms import CorruptImageError

    try:
        return main(argv)
    except (ToolError, DataError, RecordIOError, CorruptImageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
