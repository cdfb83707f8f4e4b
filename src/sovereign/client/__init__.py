"""Client-side helpers: a software WebAuthn authenticator for bots and tests."""
