"""Command-line interface: one module per command; each parses, calls the library, renders."""
