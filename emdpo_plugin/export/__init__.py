"""Export of the aggregated ensemble as a routing config (format emdpo-routing/v1)."""
