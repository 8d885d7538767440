"""The merge pipeline: plan, layout, statistics, engine, variants and comparison of merges."""
