"""Built-in trainer, Recorder API, data loading and the optimizer update rules that replay uses."""
