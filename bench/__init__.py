"""Benchmarks for the contract's performance targets (measure and print ratios; never tests)."""
