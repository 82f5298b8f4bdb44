"""Dataset names, importable without torch (recipe validation runs torch-free)."""

DATASET_NAMES: tuple[str, ...] = (
    "embedded",
    "cifar10",
    "cifar100",
    "tinyimagenet",
    "folder",
    "fashion_mnist",
)
