"""Helpers for tests, demos and benchmarks that need a model without downloading one."""
