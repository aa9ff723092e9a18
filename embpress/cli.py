"""The ``embpress`` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compressed embedding tables and corpus vectors, with an honest benchmark.")


def _mount_subcommands() -> None:
    try:
        from embpress.vectors.cli import app as vectors_app
    except ImportError:  # the retrieval side is optional while it is being built
        return
    app.add_typer(vectors_app, name="vectors", help="Compress, search and evaluate corpus vectors.")


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
