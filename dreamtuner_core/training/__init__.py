"""What every trainer of the pack shares: the host's model made trainable (:mod:`.host_training`)."""
