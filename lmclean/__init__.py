"""lmclean: record a language model's training trajectory, unlearn samples from it, and prove it."""

__version__ = "0.1.0"
