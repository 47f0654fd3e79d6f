"""mlprune: see, tune and demo pruning of multilingual LLMs calibrated on translation."""

__version__ = "0.1.0"


class MlpruneError(Exception):
    """An error a user can act on; its message is one readable sentence (no traceback shown)."""
