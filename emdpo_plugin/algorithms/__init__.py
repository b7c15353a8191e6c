"""Host-independent math (numpy/torch): written once, used by every backend."""
