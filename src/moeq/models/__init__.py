"""Architecture knowledge: the registry of MoE families, the per-expert view, loading."""
