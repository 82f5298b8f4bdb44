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
    # the distillation zoo (issue 13): RepDistiller / CRD's methods and mdistiller's DKD
    "fitnet": "engine.methods.zoo.fitnet:FitNet",
    "at": "engine.methods.zoo.at:AT",
    "sp": "engine.methods.zoo.sp:SP",
    "cc": "engine.methods.zoo.cc:CC",
    "vid": "engine.methods.zoo.vid:VID",
    "rkd": "engine.methods.zoo.rkd:RKD",
    "pkt": "engine.methods.zoo.pkt:PKT",
    "ab": "engine.methods.zoo.ab:AB",
    "ft": "engine.methods.zoo.ft:FT",
    "fsp": "engine.methods.zoo.fsp:FSP",
    "nst": "engine.methods.zoo.nst:NST",
    "kdsvd": "engine.methods.zoo.kdsvd:KDSVD",
    "crd": "engine.methods.zoo.crd:CRD",
    "dkd": "engine.methods.zoo.dkd:DKD",
    # self- and semi-supervised (issue 4)
    "simclr": "engine.methods.simclr:SimCLR",
    "rotnet": "engine.methods.rotnet:RotNet",
    "linear_eval": "engine.methods.linear_eval:LinearEval",
    "finetune": "engine.methods.finetune:FineTune",
    "mixmatch": "engine.methods.mixmatch:MixMatch",
    # the self- and semi-supervised zoo (issue 14)
    "byol": "engine.methods.byol:BYOL",
    "simsiam": "engine.methods.simsiam:SimSiam",
    "moco": "engine.methods.moco:MoCo",
    "barlow_twins": "engine.methods.barlow_twins:BarlowTwins",
    "vicreg": "engine.methods.vicreg:VICReg",
    "dino": "engine.methods.dino:DINO",
    "fixmatch": "engine.methods.fixmatch:FixMatch",
}


def method_names() -> list[str]:
    return sorted(METHODS)


def method_class(name: str) -> type:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
