"""soupkit merge / soupkit wise (filled in next)."""
