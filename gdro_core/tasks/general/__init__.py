"""The general task: any prompts (a plain file, one per line) scored by the rewards ``rewards.weights`` names,
on the user's own checkpoint; it has no built-in world."""
