"""The experiment grid over layers, heads and shots (grid), its table (table) and few-shot draws (shots)."""
