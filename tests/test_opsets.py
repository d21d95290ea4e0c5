"""graphopt.opsets: predicates that must hold on every supported torch release."""

from __future__ import annotations

import pytest
import torch

from graphopt.opsets import is_inplace_op, writes_first_argument

aten = torch.ops.aten

#: TorchScript list/scalar overloads (``add_.t`` appends to a list, ``copy_.int``) and the ``hacked_twin``
#: overloads (registered when first used) carry no inplace tag
NOT_TAGGED_BUT_WRITTEN = {"aten.add_.t", "aten.mul_.t", "aten.copy_.Tensor", "aten.copy_.int", "aten.copy_.float"}


def _untagged_twin(op) -> bool:
    return op._overloadname == "hacked_twin"


def _aten_overloads():
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            for overload in packet.overloads():
                yield getattr(packet, overload)


@pytest.mark.skipif(not hasattr(torch.Tag, "inplace"), reason="this torch has no inplace tag to compare with")
def test_the_schema_rule_agrees_with_torchs_inplace_tag():
    """torch 2.11 has no ``Tag.inplace``: the schema rule used there must name the same ops."""
    disagree = {str(op) for op in _aten_overloads()
                if (torch.Tag.inplace in op.tags) != writes_first_argument(op) and not _untagged_twin(op)}
    assert disagree <= NOT_TAGGED_BUT_WRITTEN, sorted(disagree - NOT_TAGGED_BUT_WRITTEN)


@pytest.mark.parametrize("op, expected", [
    (aten.add_.Tensor, True), (aten.copy_.default, True), (aten.masked_fill_.Scalar, True),
    (aten.add.Tensor, False), (aten.add.out, False), (aten.sort.default, False), ("not an op", False),
])
def test_is_inplace_op(op, expected):
    assert is_inplace_op(op) is expected
    if isinstance(op, torch._ops.OpOverload):
        assert writes_first_argument(op) is expected
