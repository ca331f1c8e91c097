"""The ``cm`` subcommands, one module each (L5); ``cm.cli`` dispatches to their ``main(args)``."""
