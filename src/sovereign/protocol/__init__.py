"""Protocol layer (SPEC §1-§4): types, upgrade, connection state, envelope dispatch."""
