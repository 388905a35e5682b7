"""The applications above the library: the ``lightning-maml`` sub-commands that are not Trainer
methods (``estimate``, ``plan``, ``plot``, ``experiment``), each loaded only when asked for.

They may use everything below them (the learner, callbacks, datamodules, theory); nothing below
imports them.
"""
