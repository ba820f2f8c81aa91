"""Worked example (docs/extending.md): an inner-loop variant, BOIL (Oh et al., ICLR 2021, "BOIL: Towards
Representation Change for Few-shot Learning"): the inner loop adapts the body only; the head stays at its
meta-learned weights during adaptation (ANIL's opposite: `maml.adapt=head`).

An inner-loop variant that changes *which* weights adapt is a rule: parameter name -> adapts? fsl's inner loop
(fsl.maml.loop) then hands higher's differentiable SGD those fast weights only, second order or first order as
maml.first_order says, with learned rates (maml.learned_lr) if set. BatchNorm's parameters still follow
maml.adapt_bn. Registered, it is a value of `maml.adapt`:

    python docs/examples/boil_variant.py train experiments/glyphs-conv4-1shot.yaml maml.adapt=body \\
        maml.zero_head=false name=boil
    python docs/examples/boil_variant.py test  experiments/glyphs-conv4-1shot.yaml maml.adapt=body \\
        maml.zero_head=false name=boil

(a zero head that never adapts would give every class the same logit: BOIL needs maml.zero_head=false; the run is
named glyphs-conv4-1shot-boil). tests/test_extending.py checks that the head's fast weights stay put while the
body's move, and runs a tiny cell through this script.
"""
from __future__ import annotations

import sys

from fsl.maml import is_head, register_adapt_rule


def body_only(name: str) -> bool:
    """BOIL: every parameter but the linear head's (`classifier.*`) adapts."""
    return not is_head(name)


register_adapt_rule("body", body_only)

if __name__ == "__main__":
    from fsl.__main__ import main
    sys.exit(main())
