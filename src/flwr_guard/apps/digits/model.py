"""The reference app's model: :class:`flwr_guard.models.digits_cnn.DigitsCNN`."""

from flwr_guard.models.digits_cnn import DigitsCNN

__all__ = ["DigitsCNN"]
