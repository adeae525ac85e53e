"""The contract every layer imports: errors, data and view types, step and evaluation types, schedules, keyed
random numbers, the timm adapter and metric names. It imports nothing of the project."""
