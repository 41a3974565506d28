"""The runtime: the engine loop every surface runs on, sampling, detokenization, model loading."""
