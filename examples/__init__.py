"""Examples of services built on the writer (not installed with the package)."""
