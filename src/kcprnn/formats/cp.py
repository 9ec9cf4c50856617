"""Format 'cp': implementation in progress (registers itself when complete)."""
