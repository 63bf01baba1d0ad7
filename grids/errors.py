"""Errors raised by the numpy grid layer (re-exported by qexport.errors)."""


class GridError(ValueError):
    """A value, shape or parameter that a grid or GridSpec cannot hold."""
