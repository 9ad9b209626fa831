"""Self-subject-attention (paper 3.2, Eq. 3): the room the Self-Subject-Attention node calls.

One sampling step through it: :mod:`.install` puts the state, the ``attn1``
replacement and the model wrapper on a clone of the model; at each model call
:mod:`.reference_rows` adds the reference rows (or a call of their own) and
:mod:`.replace` records their keys/values and applies :mod:`.attention` (Eq. 3)
to the generated rows. :mod:`.cache` keeps what a run needs; :mod:`.coexistence`
holds the rules for living with other packs.
"""
