"""The options every command spells the same way: ``--set`` (config overrides), ``--root`` (the nuScenes root),
``--out`` (what the command writes), ``--allow-missing`` / ``--allow-unexpected`` (key patterns), and the
hidden aliases that keep the old spellings working."""
from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to the help of an option that takes a value, has a default and does not state it
    already; a list default shows as its items (``1 2 3``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = (action.default in (None, [], argparse.SUPPRESS) or not action.option_strings
                 or action.nargs == 0)    # a flag: its default is its absence
        if unset or "default" in text:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def add_option(parser: argparse.ArgumentParser, flag: str, *,
               aliases: tuple[str, ...] = (), **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, **kwargs)``; each of `aliases` (an old spelling) sets the same value and is left
    out of ``--help``."""
    if aliases and kwargs.get("required"):
        raise ValueError(f"{flag}: a required option cannot have aliases (the alias would not satisfy it)")
    action = parser.add_argument(flag, **kwargs)
    for alias in aliases:
        parser.add_argument(alias, **{**kwargs, "dest": action.dest, "default": argparse.SUPPRESS,
                                      "help": argparse.SUPPRESS})
    return action


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...`` (repeatable; old spelling ``--override``), read as ``args.set``."""
    add_option(parser, "--set", aliases=("--override",), nargs="+", action="extend", default=[], metavar="KEY=VALUE",
               help="override config fields, e.g. optim.lr=1e-4 data.batch_size=4 (see `aqrcmt configs`)")


def add_root_option(parser: argparse.ArgumentParser, help: str = "nuScenes root (default: the config's data.root)",
                    **kwargs: Any) -> None:
    """``--root DIR`` (old spelling ``--data``), read as ``args.root``."""
    add_option(parser, "--root", aliases=() if kwargs.get("required") else ("--data",), help=help, **kwargs)


def add_out_option(parser: argparse.ArgumentParser, help: str, aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
    """``--out DIR`` (plus the command's old spellings), read as ``args.out``."""
    add_option(parser, "--out", aliases=aliases, help=help, **kwargs)


def add_key_pattern_options(parser: argparse.ArgumentParser, source: str) -> None:
    """``--allow-missing`` / ``--allow-unexpected PATTERN ...``: a list, and repeatable."""
    parser.add_argument("--allow-missing", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help=f"fnmatch patterns of model keys that {source} may lack")
    parser.add_argument("--allow-unexpected", nargs="+", action="extend", default=[], metavar="PATTERN",
                        help=f"fnmatch patterns of {source} keys the model lacks, to drop instead of refusing")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` plus ``--root`` (and ``--version`` where the command has it) as config overrides."""
    overrides = list(args.set)
    overrides += [f"data.root={args.root}"] if getattr(args, "root", None) else []
    overrides += [f"data.version={args.version}"] if getattr(args, "version", None) else []
    return overrides
