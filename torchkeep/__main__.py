"""``python -m torchkeep`` and the ``torchkeep`` command: a clear line when the ``cli`` extra is missing."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line; without click and rich, say how to get them instead of a traceback."""
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        print(
            f"error: the torchkeep command needs the cli extra ({exc.name} is not installed): "
            "pip install 'torchkeep[cli]'",
            file=sys.stderr,
        )
        return 2
    from torchkeep.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
