"""`python -m tui` == `kdtui`."""

from tui.cli import main

main()
