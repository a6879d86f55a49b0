"""Output constrained to a JSON schema, regex, choice or grammar: the engine-side manager
(compiling off the step loop, masking logits in the runner) and its grammar backends."""
from sarathi.structured_outputs.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
