"""lowbit test suite (a package, so test folders such as tests/kernels never shadow installed modules)."""
