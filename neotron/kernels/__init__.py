"""Kernels for the new layers. Each op lives in its own folder with a plain-PyTorch
`reference.py` beside the fast paths; the names exported here dispatch to the fastest
path available for the inputs' device.

The functions are imported eagerly (these modules import only torch; optional GPU packages
such as fla are imported inside the dispatchers). Eager import also matters for correctness:
`delta_rule` is both a subpackage and the function it exports, and binding the function here
after the subpackage is imported keeps `neotron.kernels.delta_rule(...)` a call.
"""

from neotron.kernels.delta_rule import delta_rule
from neotron.kernels.gated_delta_rule import gated_delta_rule
from neotron.kernels.ttt import ttt_linear, ttt_mlp

__all__ = ["delta_rule", "gated_delta_rule", "ttt_linear", "ttt_mlp"]
