"""Learning: cohort, splits, leakage checks, models, training, evaluation, model packages.

Importing this package does not import torch; the command-line parser needs only these names.
"""

#: The architectures of :data:`pipeline.learn.models.ARCHITECTURES` (checked by a test).
ARCHITECTURE_NAMES = ("conv5fc3", "densenet121", "resnet10", "resnet18", "unet", "unet-large")
#: Those of them that segment (``--task segmentation``; the others predict one value or class per image).
SEGMENTATION_ARCHITECTURE_NAMES = ("unet", "unet-large")
