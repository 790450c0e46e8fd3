"""Layer 4: the ``dirtyring`` command line."""
