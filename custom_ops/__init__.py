"""The MoE op contract: ONNX schemas, the torch tracing op, the NumPy reference.

Importing this package does not import torch; ``custom_ops.torch_op`` does.
"""

from .reference import MoEAttributes, moe_reference
from .schemas import DOMAIN, register_schemas

__all__ = ["DOMAIN", "MoEAttributes", "moe_reference", "register_schemas"]
