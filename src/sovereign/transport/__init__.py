"""Transport adapters: picows WebSocket listener (thin glue over the protocol core)."""
