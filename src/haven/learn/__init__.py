"""Learning: preprocess (audited data → Zarr), models, the training loop, tune, and the tasks.

``preprocess`` reads pixels through :mod:`haven.sources` and encodes labels through the
project's :class:`~haven.learn.tasks.base.Task`; ``data`` reads the Zarr splits; ``models`` and
``weights`` build backbones with local pretrained weights; ``train`` is the loop as small steps
(over ``checkpoint``, ``ddp`` and ``infer``); ``tune`` runs Ray Tune over ``train.fit``;
``launch`` starts the processes a stage needs (torchrun, Ray on every Slurm node).
"""
