"""Format 'ht': implementation in progress (registers itself when complete)."""
