"""Devices and processes: the (data, model) mesh, per-device memory plans, several processes."""
