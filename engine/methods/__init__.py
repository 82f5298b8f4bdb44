"""Training methods: one module each, behind the small `Method` interface in base.py."""
