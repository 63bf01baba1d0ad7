"""Error types. Every user-facing failure is a QExportError: the CLI prints its message on one
line and exits with code 2, leaving no partial artifact behind."""
from qexport.grids.errors import GridError


class QExportError(Exception):
    """Root of qexport's user-facing errors."""


class InputError(QExportError):
    """A model, IR, calibration text or option that qexport cannot use as given."""


class UnsupportedError(QExportError):
    """An architecture, format or combination that qexport does not support."""


class IRError(QExportError):
    """An IR folder or in-memory QModel that violates the IR's rules."""


class LoweringError(QExportError):
    """A backend cannot hold a tensor as quantized (shape, bit width, grid)."""


class VerifyError(QExportError):
    """An artifact that does not match its IR."""


class NumericsError(QExportError):
    """NaN/inf weights, a Hessian that stays singular, and similar numerical failures."""


__all__ = ["QExportError", "InputError", "UnsupportedError", "IRError", "LoweringError",
           "VerifyError", "NumericsError", "GridError"]
