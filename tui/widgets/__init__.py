"""Widgets of the full-screen app. `format` and `series` are textual-free (the CLI uses them too)."""
