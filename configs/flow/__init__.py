"""Reproduction configs (ml_collections); each module defines get_config()."""
