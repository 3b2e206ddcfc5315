"""The engine process: how it is launched, supervised and talked to."""
