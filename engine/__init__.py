"""kdtui's training engine. Importing this package must stay torch-free (recipes, run dirs)."""
