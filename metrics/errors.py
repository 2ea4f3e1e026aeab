"""The one exception type of the metrics package: a one-line message saying what was wrong and how to fix it."""


class MetricsError(ValueError):
    """Bad input to an evaluation (images, reference, detector, metric list); the CLIs print it as one line."""
