"""Empath: a durable, fast mail transfer agent."""

__version__ = "0.1.0"
