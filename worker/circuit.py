"""The circuit breakers live in :mod:`notifyctl.circuit` (the status, the alerts and the metrics
read them from the foundation); these names stay importable from here."""

from notifyctl.circuit import CLOSED, HALF_OPEN, OPEN, THROTTLED, Circuits, take_recoveries

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "THROTTLED", "Circuits", "take_recoveries"]
