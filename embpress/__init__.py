"""embpress: compressed embedding tables and corpus vectors, with an honest memory benchmark."""

__version__ = "0.1.0"
