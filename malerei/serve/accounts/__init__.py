"""Users, passwords, API keys and web sessions."""
