"""Method names -> implementing classes, resolved lazily so recipe validation stays torch-free."""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "supervised": "engine.methods.supervised:Supervised",
    # distillation (issue 3): HSAKD teachers, students, deep supervision
    "hsakd_teacher": "engine.methods.hsakd_teacher:HSAKDTeacher",
    "kd": "engine.methods.distill:KD",
    "hsakd": "engine.methods.distill:HSAKD",
    "teacher_target": "engine.methods.distill:TeacherTarget",
    "supervised_aux": "engine.methods.distill:SupervisedAux",
    # self- and semi-supervised (issue 4)
    "simclr": "engine.methods.simclr:SimCLR",
    "rotnet": "engine.methods.rotnet:RotNet",
    "linear_eval": "engine.methods.linear_eval:LinearEval",
    "finetune": "engine.methods.finetune:FineTune",
    "mixmatch": "engine.methods.mixmatch:MixMatch",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def method_class(name: str) -> type:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
