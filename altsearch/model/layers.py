"""Standard layers that skip random initialisation.

Every parameter is assigned from a checkpoint, so initialising them is wasted work. Worse, on the
meta device the initialisers route through torch's reference implementations, whose first use
imports ``torch._dynamo``: seconds added to every cold ``altsearch search``.
"""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class Conv2d(nn.Conv2d):
    def reset_parameters(self) -> None:
        pass
