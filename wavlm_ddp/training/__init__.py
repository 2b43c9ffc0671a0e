"""What the Brain adds to SpeechBrain: the global batch, schedules and reports."""
