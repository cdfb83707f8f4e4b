"""Authentication: WebAuthn ceremonies (registration and login) and sessions."""
