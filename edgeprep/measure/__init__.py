"""edgeprep.measure."""
