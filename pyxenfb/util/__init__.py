"""Small utilities any layer may use: a log-line budget, malloc arenas."""
