"""The CPU forgetting-recovery demo: pretrain a tiny LM on two languages, continue it on a third
with :class:`~obim_trainer.OBIMCallback`, and compare merges of its checkpoints (paper Table 2 in miniature)."""
