"""Image classification problems (ImageNet-1k ResNet-50, Fashion-MNIST ResNet-18).

``data``: ImageFolder trees checked with actionable errors, the standard augmentations, and
loaders whose order and augmentation are functions of (seed, epoch, index) only, so that a
resumed run sees the same batches. ``fashion_mnist``: Debian's Fashion-MNIST IDX files
turned into such a tree (``python -m experiments.data fashion-mnist``). See docs/images.md.
"""
