"""The `equiseg` command line (installed as the `equiseg_cli` package): messages, options and exit codes only."""
