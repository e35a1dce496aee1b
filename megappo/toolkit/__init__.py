"""The logic behind the tools, the demo and the benchmarks: a leaf package at the top of the
layering. It imports the core packages; nothing in the core imports it.

    convert         HF <-> Megatron checkpoint conversion (``tools/convert_*.py``)
    compare         log-prob parity: Megatron vs transformers, engine vs Megatron (``tools/compare_logprobs.py``)
    evaluation      greedy accuracy of an HF directory (``tools/evaluate.py``)
    throughput      actor-update tokens/s and MFU (``tools/bench_train.py``)
    toy             the toy arithmetic task of the CPU demo and tests
    char_tokenizer  an offline character-level tokenizer for the toy task
"""
