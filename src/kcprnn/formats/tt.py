"""Format 'tt': implementation in progress (registers itself when complete)."""
