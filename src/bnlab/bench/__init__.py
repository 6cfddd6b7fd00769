"""``bnlab bench``: the layer's speed and accuracy against torch (:mod:`.layer`) and the lab's
training against a plain PyTorch loop (``bnlab bench lab``, :mod:`.lab`)."""

from .layer import main

__all__ = ["main"]
