"""Format 'bt': implementation in progress (registers itself when complete)."""
