"""The work of each ``segkit`` command, one module per group; :mod:`segkit.cli` parses and dispatches.

Each module has ``add_parsers(sub)``, which adds its sub-commands to the ``segkit`` parser with their
``handler`` (a function of the parsed arguments returning the exit status).
"""
