"""Training side: ``OBIMCallback``, candidate checkpoints, the run record and training text."""
