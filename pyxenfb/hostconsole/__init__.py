"""`pyxenfb-console`: every domain's VNC console in one web page (docs/console.md)."""
