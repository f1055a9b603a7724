"""Models the library's benchmarks and the reference app share (torch only).

:class:`~flwr_guard.models.digits_cnn.DigitsCNN`: the reference app's CNN for 8x8 digits.
"""
