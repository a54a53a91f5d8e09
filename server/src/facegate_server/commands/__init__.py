"""The commands a server install adds to `facegate` (entry-point group `facegate.commands`)."""
