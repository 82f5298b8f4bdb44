"""Fine-tuning: supervised training that starts from pretrained weights with a new classifier.

The weights come from torchvision's ImageNet resnet18 (`model.arch = "resnet18_imagenet"`,
`model.pretrained = true` or a state-dict path; the zoo factory loads them) or from any kdtui
run (`[teacher] from` / `checkpoint`: its backbone, whatever head it had). Staged learning
rates are the `stages` schedule (engine/optim.py); everything else is plain supervised training.
"""

from __future__ import annotations

from torch import nn

from engine.methods.base import Method
from engine.methods.pretrained import backbone_checkpoint, load_backbone


class FineTune(Method):
    def build_model(self) -> nn.Module:
        r = self.recipe
        if not (r.teacher.from_recipe or r.teacher.checkpoint):
            return super().build_model()  # model.pretrained: torchvision weights, classifier replaced
        from engine.models import build_model

        model = build_model(r.model.arch, r.model.num_classes or self.data.num_classes)
        load_backbone(model, backbone_checkpoint(r), r.model.arch, r.teacher.arch)
        return model
