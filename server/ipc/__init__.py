"""Front-end processes ⇄ engine process: the record format (:mod:`records`) and its two ends."""
