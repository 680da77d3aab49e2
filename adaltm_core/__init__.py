"""The small core both libraries share: the user-facing error type, atomic file writes, audio input and the one
typed config parser. It imports nothing else of this project."""
