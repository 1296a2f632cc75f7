"""The one error of de-identification, shared by the header cleaner, the writer, images and the stage."""

from __future__ import annotations


class AnonymizeError(Exception):
    """A file that cannot be de-identified safely; the message is a PHI-free reason."""
