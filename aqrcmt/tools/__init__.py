"""The commands of ``aqrcmt`` (see :mod:`aqrcmt.cli`), one module per command.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is the only place that parses
arguments or prints for its command; the library modules it calls know nothing of the command line.
"""
