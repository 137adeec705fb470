"""The experiment grid over layers, heads and shots (grid) and its few-shot draws (shots); pipeline.heads.publish writes it."""
