"""Per-linear solvers: (W, stats, args) -> QuantResult. RTN and GPTQ."""
