"""`python -m pyxenfb` is `pyqemu-dm`."""
import sys

from .cli import main

sys.exit(main())
