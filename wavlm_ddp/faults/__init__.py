"""What keeps a run alive and its work safe: checkpoints, guards, preemption, the folder lock."""
