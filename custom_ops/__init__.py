"""The MoE op contract: ONNX schemas, the torch tracing op, the NumPy reference.

Importing this package imports neither torch (``custom_ops.torch_op`` does) nor onnx: the schemas module, and
onnx with it, loads on first use of ``DOMAIN`` or ``register_schemas``, so a serving host needs neither.
"""

from .reference import MoEAttributes, moe_reference

__all__ = ["DOMAIN", "MoEAttributes", "moe_reference", "register_schemas"]


def __getattr__(name: str):
    if name in ("DOMAIN", "register_schemas"):
        from . import schemas

        return getattr(schemas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
