"""Console layer, between the devices and the displays: the surface and its
dirty region (`core`), key codes and layouts
(`keymap`, `keymaps/`)."""
