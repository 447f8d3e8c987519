"""``gradience.vnext.integrations``: the reference tool's path to the framework integrations (lazy)."""
