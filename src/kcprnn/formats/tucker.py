"""Format 'tucker': implementation in progress (registers itself when complete)."""
