"""The distillation zoo: one module per method of RepDistiller's CIFAR-100 benchmark plus DKD,
each a `FeatureDistill` (base.py) registered by name in engine/methods/registry.py."""
