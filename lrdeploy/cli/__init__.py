"""The command line (typer) and what it prints (rich tables); a thin layer over the Python API."""
