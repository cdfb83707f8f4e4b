"""Policy: auth, sessions, messaging, groups. Services raise SovereignError; storage owns SQL."""
