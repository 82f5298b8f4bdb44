"""CLI command groups. Each module registers its commands on `tui.cli.app`; all stay torch-free at import."""
