"""The model catalog: records on disk (``store``), GGUF header metadata (``gguf``), and the
detached actor that owns them in a Ray cluster (``actor``)."""
