"""The ``fastsft`` CLI's subcommands, one module each (``fastsft.cli`` parses the arguments)."""
