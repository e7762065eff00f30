"""Mechanisms that drive QEMU: argv builder, process, QMP, capability probes."""
