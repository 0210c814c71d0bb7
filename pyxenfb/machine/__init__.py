"""Machine layer: the command line, QMP monitor and privilege drop around
the xenpv machine (`pyxenfb/machine_pv.py`)."""
