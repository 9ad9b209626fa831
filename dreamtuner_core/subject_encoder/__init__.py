"""The subject encoder (paper 3.1, Fig. 4, Eq. 1): the room the SubjectEncoder nodes call.

:mod:`.model` is the encoder (ResBlocks over multi-layer CLIP features, the S-E-A layers) and
Eq. 1 itself; :mod:`.patch` puts Eq. 1 on a model, for sampling and for training; :mod:`.file`
reads and writes its files; :mod:`.clip_features` gives its CLIP features.
"""
