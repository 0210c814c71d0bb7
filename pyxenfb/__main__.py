"""`python -m pyxenfb` is `pyqemu-dm`."""
import sys

from .launch import main

sys.exit(main())
