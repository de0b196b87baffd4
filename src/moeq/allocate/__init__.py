"""Bit allocation: profile a model (expert usage, outlier and block-importance scores, per-module
sensitivity at candidate widths), then turn the profile into a :class:`~moeq.config.BitPlan`, by
composable QuantMoE-Bench rules (:mod:`.plan`) or by a budgeted search (:mod:`.search`)."""
