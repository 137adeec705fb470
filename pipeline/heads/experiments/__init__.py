"""The experiment grid over layers, heads and shots (grid), its folder names (naming), table (table) and few-shot draws (shots)."""
