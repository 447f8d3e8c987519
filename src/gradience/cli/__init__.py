"""The command line: a thin layer that parses flags, calls the library and renders its results."""
