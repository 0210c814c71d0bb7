"""Console layer, between the devices and the displays: the surface and its
dirty region (`core`), rectangles (`region`), key codes and layouts
(`keymap`, `keymaps/`)."""
