"""What several test modules share: small method parameters, processes with deadlines, sweep writers, gloo runs, image files."""
