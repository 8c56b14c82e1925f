"""Trainer pieces (docs/design.md §6): config, parallelize, optim, checkpoint, metrics; the loop
itself is `launch/pretrain.py`."""
