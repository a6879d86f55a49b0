"""The module path the original integration documented; same server as sarathi.entrypoints.openai."""
