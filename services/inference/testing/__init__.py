"""TEST AND BENCHMARK TOOLING ONLY: stand-ins for GPU runtimes, never deployed by the stack."""
