"""The gallery: one attention variant per file (see README)."""
