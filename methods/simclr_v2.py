"""SimCLRv2: Big Self-Supervised Models are Strong Semi-Supervised Learners (Chen et al., NeurIPS 2020).

SimCLR with a deeper (3-layer) projection head whose first layer is kept for
fine-tuning: the semi-supervised evaluation fine-tunes from the middle of the head
(``eval.semi.from_projector_layer: 1``), which the paper found better than from the
backbone with few labels. The paper's self-distillation (a fine-tuned teacher labelling
unlabelled data for a student) is not part of pretraining: it is an optional step of the
semi-supervised evaluation (``eval.semi.distill_epochs``, :mod:`evaluations.distill`).
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from core.contract import feature_dim
from core.errors import BadInput
from methods import register
from methods.simclr import SimCLR, SimCLRParams


class SimCLRV2Params(SimCLRParams):
    temperature: float = Field(0.1, gt=0, description="NT-Xent temperature (SimCLRv2: 0.1)")
    proj_layers: int = Field(3, ge=2, description="3 in SimCLRv2 (the first is kept for fine-tuning)")


@register
class SimCLRV2(SimCLR):
    name = "simclr_v2"
    Params = SimCLRV2Params
    paper = "Chen et al., NeurIPS 2020, Big Self-Supervised Models are Strong Semi-Supervised Learners"

    params: SimCLRV2Params

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        """The backbone plus the first ``projector_layers`` (Linear, BN, ReLU) layers of the head."""
        hidden = self.params.proj_layers - 1
        if not 0 <= projector_layers <= hidden:
            raise BadInput(
                f"eval.semi.from_projector_layer: {projector_layers} is outside "
                f"0..{hidden} for simclr_v2 with {self.params.proj_layers} head layers"
            )
        if projector_layers == 0:
            return self.backbone, feature_dim(self.backbone)
        return nn.Sequential(self.backbone, self.projector[: 3 * projector_layers]), self.params.proj_hidden_dim
