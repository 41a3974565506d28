"""The core: positions, architectures, the streaming KV cache, attention and its kernels, the captured stepper."""
