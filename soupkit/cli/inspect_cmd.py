"""soupkit inspect / soupkit convert (filled in next)."""
