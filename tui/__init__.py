"""kdtui's user side: the Typer CLI, the launcher, the run store and the Textual app.

Nothing here imports torch at module import time.
"""
