"""``bnlab bench``: the layer's speed and accuracy against torch (:mod:`.layer`), the lab's
training against a plain PyTorch loop (``bnlab bench lab``, :mod:`.lab`), and a ResNet's
training step with torch's, bnlab's and bnlab's fused BatchNorm (``bnlab bench resnet``,
:mod:`.resnet`)."""

from .layer import main

__all__ = ["main"]
