"""Small utilities any layer may use: rectangles and dirty regions, a log-line
budget, malloc arenas."""
