"""The command line: argument parsing, console progress, the demo."""

from pneumoscan.cli.app import main

__all__ = ["main"]
