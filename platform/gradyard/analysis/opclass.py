"""Sort operators into the classes the roofline speaks of.

One classifier serves both the dispatch-mode census (which sees
``aten.mm.default``) and the profiler (which names ``aten::mm``): both are
reduced to the qualified name ``namespace::op``.  Where torch tags an op
(`pointwise`, `reduction`, `view_copy`) the tag decides; names decide the rest.
"""

from __future__ import annotations

import functools

import torch

MATMUL = "matmul/conv"
ELEMENTWISE = "elementwise"
REDUCTION = "reduction/norm"
DATA_MOVEMENT = "data movement"
EMBEDDING = "embedding"
COMMUNICATION = "communication"
OTHER = "other"

CLASSES = (MATMUL, ELEMENTWISE, REDUCTION, DATA_MOVEMENT, EMBEDDING, COMMUNICATION, OTHER)

_COMM_NAMESPACES = {"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"}
_COMM_WORDS = ("nccl", "gloo", "allreduce", "all_reduce", "all_gather", "allgather", "reduce_scatter",
               "broadcast", "all_to_all", "alltoall", "record_param_comms", "barrier")
_MATMUL_WORDS = ("mm", "matmul", "linear", "conv", "attention", "attn", "einsum", "addmv", "mv", "dot",
                 "bilinear", "_scaled_mm")
_REDUCTION_WORDS = ("norm", "softmax", "sum", "mean", "var", "std", "amax", "amin", "max", "min", "argmax",
                    "argmin", "prod", "logsumexp", "cumsum", "cumprod", "nll_loss", "cross_entropy", "mse_loss",
                    "pool", "topk", "sort", "all", "any", "count_nonzero", "dist")
_MOVEMENT_WORDS = ("view", "copy", "clone", "cat", "stack", "index", "gather", "scatter", "slice", "select",
                   "transpose", "permute", "expand", "reshape", "empty", "zeros", "ones", "full", "fill",
                   "zero_", "as_strided", "split", "unbind", "pad", "contiguous", "_to_copy", "to", "detach",
                   "alias", "squeeze", "unsqueeze", "flatten", "narrow", "roll", "flip", "repeat", "t",
                   "lift_fresh", "set_", "resize", "masked_select", "nonzero", "arange", "_unsafe_view",
                   "new_", "like", "chunk", "tril", "triu", "scalar_tensor", "_local_scalar_dense", "item")


def qualified_name(func: object) -> str:
    """``aten::mm`` for ``torch.ops.aten.mm.default`` (overload dropped)."""
    packet = getattr(func, "_overloadpacket", func)
    name = getattr(packet, "_qualified_op_name", None)
    return name if name else str(func)


@functools.lru_cache(maxsize=4096)
def _tags(qualname: str) -> frozenset[str]:
    ns, _, op = qualname.partition("::")
    try:
        packet = getattr(getattr(torch.ops, ns), op)
        return frozenset(str(t).split(".")[-1] for ov in packet.overloads() for t in getattr(packet, ov).tags)
    except (AttributeError, RuntimeError):
        return frozenset()


def _has_word(op: str, words: tuple[str, ...]) -> bool:
    parts = [p for p in op.strip("_").split("_") if p]
    return any(w == op or w in parts or (len(w) > 3 and w in op) for w in words)


@functools.lru_cache(maxsize=4096)
def op_class(qualname: str) -> str:
    """Class of an operator given its qualified name (``aten::addmm``) or a profiler event name."""
    ns, sep, op = qualname.partition("::")
    if not sep:
        ns, op = "", qualname
    low = qualname.lower()
    if ns in _COMM_NAMESPACES or any(w in low for w in _COMM_WORDS):
        return COMMUNICATION
    if ns not in ("aten", "prims", ""):
        return OTHER
    if ns == "" and (" " in qualname or "." in qualname):
        return OTHER  # profiler regions like "autograd::engine::evaluate_function: MmBackward0"
    from torch.utils.flop_counter import flop_registry

    packet = getattr(torch.ops.aten, op, None) if ns == "aten" else None
    if packet is not None and packet in flop_registry:
        return MATMUL
    if "embedding" in op:
        return EMBEDDING
    if op.startswith(("_foreach_", "_fused_adam", "_fused_sgd", "_fused_adagrad")):
        return ELEMENTWISE  # optimizer updates: elementwise over many tensors
    tags = _tags(f"aten::{op}") if ns in ("aten", "") else frozenset()
    if "view_copy" in tags:
        return DATA_MOVEMENT
    if _has_word(op, _MATMUL_WORDS) and "backward" not in op or op == "convolution_backward":
        return MATMUL
    if "reduction" in tags:  # before pointwise: `max` is both a reduction and `max.other`
        return REDUCTION
    if "pointwise" in tags or _has_word(op, ("dropout", "bernoulli", "uniform", "normal", "random")):
        return ELEMENTWISE
    if _has_word(op, _REDUCTION_WORDS):
        return REDUCTION
    if _has_word(op, _MOVEMENT_WORDS):
        return DATA_MOVEMENT
    if op.endswith("_backward") and _has_word(op.replace("_backward", ""), ("threshold", "gelu", "silu", "sigmoid",
                                                                              "tanh", "hardtanh", "elu", "leaky_relu")):
        return ELEMENTWISE
    return OTHER
