"""Model merging: formulas (methods), block tables (blocks), architecture checks (arch),
per-key decisions and the streaming write plan (plan), recipes (recipe), running them (run),
and model comparison (diff)."""
