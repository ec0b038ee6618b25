"""Runtime fixtures (one vLLM engine per test session): filled in with the runtime."""
