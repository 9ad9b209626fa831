"""Interleaved classifier-free guidance (paper 3.2, Eq. 4-6): the room the InterleavedCFG nodes call.

:mod:`.interleaved_cfg` holds the equations (one function), the GUIDER and the sampler entry
point; :mod:`.step_clock` tells which sampler step each evaluation belongs to.
"""
