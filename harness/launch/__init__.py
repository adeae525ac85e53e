"""Where a trial's processes come from: torchrun's environment, Ray Train workers, Ray itself (Tune, the reaper)."""
