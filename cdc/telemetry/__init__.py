"""Observability: Prometheus metrics, the health server and structured logs. Imports
only ``cdc.settings``/``cdc.errors``; every I/O stage may import it."""
