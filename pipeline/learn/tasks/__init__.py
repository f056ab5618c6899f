"""The learning tasks: one module (or package) each, whose ``TASK`` implements :class:`~pipeline.learn.task.Task`.

Classification and regression predict one target per image (what they share is in :mod:`.image`: the cohort,
the participant level's prediction, the external evaluation); segmentation predicts a label per voxel. The
registry (:mod:`pipeline.learn.registry`) finds them without importing this package's modules.
"""
