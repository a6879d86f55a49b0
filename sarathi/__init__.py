"""sarathi: a Sarathi-style LLM serving engine with a vAttention KV cache and AdaptiVocab support."""
from sarathi.outputs import CompletionOutput, Logprob, RequestOutput
from sarathi.lora.request import LoRARequest
from sarathi.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest", "__version__"]


def __getattr__(name):
    # Heavy imports (torch, the model) only when used.
    if name == "LLM":
        from sarathi.entrypoints.llm import LLM
        return LLM
    if name == "LLMEngine":
        from sarathi.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncLLMEngine":
        from sarathi.engine.async_llm_engine import AsyncLLMEngine
        return AsyncLLMEngine
    if name == "EngineConfig":
        from sarathi.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
