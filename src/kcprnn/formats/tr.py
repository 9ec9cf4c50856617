"""Format 'tr': implementation in progress (registers itself when complete)."""
