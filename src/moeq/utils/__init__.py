"""Small shared helpers: progress bars, device and memory, atomic output folders."""
