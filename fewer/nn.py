"""Drop-in layers. ``QuantLinear``: nn.Linear whose three GEMMs run on NVFP4 / MXFP8 operands as a
training recipe says (TetraJet-v2, the NVIDIA recipe; home and docs: ``fewer/fqt``). Usually applied
to a whole model with ``fewer.convert_for_training(model, "tetrajet_v2")``."""

from .fqt import QuantLinear

__all__ = ["QuantLinear"]
