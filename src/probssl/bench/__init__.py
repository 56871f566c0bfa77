"""Benchmark harness: quality suites (``probssl bench SUITE``), the speed table (``probssl bench speed``)."""
