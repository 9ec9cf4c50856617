"""Format 'kcp': implementation in progress (registers itself when complete)."""
