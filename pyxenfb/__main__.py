"""`python -m pyxenfb` is `pyqemu-dm`."""
import sys

from .zygote.launch import main

sys.exit(main())
