"""The configs shipped with segkit, installed as this package's data (see :mod:`segkit.config_files`)."""
