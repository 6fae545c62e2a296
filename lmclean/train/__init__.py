"""Built-in trainer, Recorder API and data loading (the update rules replay uses are lmclean.optim)."""
