"""Sinks: where record batches go (files, store, exporter, top)."""
