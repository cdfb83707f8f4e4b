"""Generated protobuf code for sovereign.v1 (built from proto/ by setup.py)."""
