"""The vocabulary and small utilities every layer may use: pixel formats,
rectangles and dirty regions, a log-line budget, malloc arenas, C libraries opened on first use."""
