"""`fitnet`: hints (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

A regressor maps the student's feature feat[hint_layer] to the shape of the teacher's, and the
hint loss is the mean squared error between them (RepDistiller's `HintLoss`: nn.MSELoss, mean
over every element; the teacher side is a constant).

The regressor is RepDistiller's `ConvReg` (HobbitLong/RepDistiller, models/util.py): a 3x3
stride-2 conv when the student map is twice the teacher's size, a 4x4 stride-2 transposed conv
when half, otherwise a valid conv of kernel 1 + (student size - teacher size); then BatchNorm
and ReLU. Like RepDistiller (train_student.py / helper/loops.py `--distill hint`) the hint
trains jointly with the cross-entropy by default (init_epochs 0), hint_layer 2, beta 100
(scripts/run_cifar_distill.sh, `--distill hint -a 0 -b 100`; also mdistiller CFG.FITNET).

With `distill.init_epochs > 0` the run first does FitNets' stage 1 (the paper's hint training):
the student's parameters up to the hint layer (found as those the hint map depends on) and the
regressor train on the hint loss alone, logged as phase "init"; BatchNorm layers outside that
part stay in eval mode then, so their running statistics do not move either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.data import DataBundle
from engine.methods.zoo.base import FeatureDistill
from engine.models.base import Features
from engine.recipe import Recipe


class ConvReg(nn.Module):
    """(B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt): conv (or transposed conv) + BN + ReLU."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size, use_relu: bool = True) -> None:
        super().__init__()
        (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"fitnet: cannot regress a {s_h}x{s_w} student map onto a {t_h}x{t_w} teacher map "
                             "(the student map must be at least as large, or exactly half)")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


def hint_loss(regressed: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over every element; the teacher side is a constant."""
    return F.mse_loss(regressed, teacher.detach())


def hint_map(features: Features, layer: int, who: str) -> Tensor:
    maps = features.as_list()
    if not 0 <= layer < len(maps) - 1:
        raise ValueError(f"distill.fitnet.hint_layer: the {who} has feature maps 0..{len(maps) - 2} "
                         f"(index {len(maps) - 1} is the pooled vector), got {layer}")
    return maps[layer]


class FitNet(FeatureDistill):
    default_feature_weight = 100.0
    default_init_epochs = 0  # RepDistiller trains the hint jointly; > 0 runs FitNets' hint stage first

    def __init__(self, recipe: Recipe, data: DataBundle, device: torch.device) -> None:
        super().__init__(recipe, data, device)
        self.hint_parameters = self._hint_dependencies() if self.init_epochs else []

    def build_modules(self, student: Features, teacher: Features) -> nn.ModuleDict:
        self.hint_layer = self.recipe.distill.fitnet.hint_layer
        s, t = hint_map(student, self.hint_layer, "student"), hint_map(teacher, self.hint_layer, "teacher")
        return nn.ModuleDict({"regressor": ConvReg(s.shape, t.shape)})

    def _hint_dependencies(self) -> list[nn.Parameter]:
        """The student parameters feat[hint_layer] depends on (its layers up to the hint), found
        through autograd on a 2-image batch in eval mode (no BN statistics move)."""
        size = self.data.image_size
        x = torch.zeros(2, 3, size, size, device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        was_training = self.model.training
        self.model.eval()
        hint = self.model(x, features=True).as_list()[self.hint_layer]
        self.model.train(was_training)
        grads = torch.autograd.grad(hint.sum(), params, allow_unused=True)
        return [p for p, g in zip(params, grads, strict=True) if g is not None]

    def _hint(self, student: Features, teacher: Features) -> Tensor:
        regressed = self.distill_modules["regressor"](student.as_list()[self.hint_layer])
        return hint_loss(regressed, teacher.as_list()[self.hint_layer])

    def feature_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        return self._hint(student, teacher)

    # ---- FitNets' stage 1 ------------------------------------------------------
    def init_parameters(self) -> list[nn.Parameter]:
        return self.hint_parameters + list(self.distill_modules.parameters())

    def init_loss(self, student: Features, teacher: Features, labels: Tensor, indices: Tensor | None) -> Tensor:
        return self._hint(student, teacher)

    def train_mode(self) -> None:
        super().train_mode()
        if self.phase == "init":  # layers past the hint are not trained: keep their BN statistics too
            trained = {id(p) for p in self.hint_parameters}
            for module in self.model.modules():
                own = list(module.parameters(recurse=False))
                if own and not any(id(p) in trained for p in own):
                    module.training = False
