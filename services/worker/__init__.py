"""Inference workers: one process per device, hosting model instances."""
