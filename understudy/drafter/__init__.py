"""The drafter: the EAGLE-style model (`model`), its on-disk format checked in one place (`format`, torch-free),
training (`train`), the warm-up recipe (`warmup`) and vLLM export (`export`). Imports nothing above the engine."""
