"""Learning: cohort, splits, leakage checks, models, training, evaluation, model packages.

Importing this package does not import torch; the command-line parser needs only these names.
"""

#: The architectures of :data:`pipeline.learn.models.ARCHITECTURES` (checked by a test).
ARCHITECTURE_NAMES = ("conv5fc3", "densenet121", "resnet10", "resnet18")
