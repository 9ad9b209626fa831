"""The one exception type the pack raises for bad input.

ComfyUI shows an exception's message in the node's error panel, so every
message names the input that was wrong and says how to fix it.
"""


class DreamTunerInputError(ValueError):
    """An input a user wired or typed cannot be used; the message says why and what to do."""
