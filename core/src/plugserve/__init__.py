"""plugserve: an LLM inference engine whose hardware support is a set of plugins."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "EngineConfig", "__version__"]


def __getattr__(name):  # lazy: `import plugserve` must stay cheap for the CLI and platform listing
    if name == "LLM":
        from plugserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from plugserve.sampling_params import SamplingParams
        return SamplingParams
    if name == "EngineConfig":
        from plugserve.config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
