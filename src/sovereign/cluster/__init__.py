"""Cluster mode's process and transport side (SPEC §12.27).

``redisbus`` implements the services' ``Bus`` port over Redis pub/sub; ``supervisor``
runs ``sovereign serve --workers N``. Like ``transport/``, this package is a shell the
services never import: they see only ``services.ports.Bus``. See docs/scaling.md.
"""
