"""Two tiers side by side on the user's own eval set, through the stack as clients reach it.

`python -m serve_app.compare --eval eval.jsonl --targets small,vllm-small` sends every prompt of
the eval set to each target (a tier name, the `model` a client sends) at a chosen concurrency,
streamed, and writes what a team needs to choose between two engines or versions: throughput,
time to first token and between tokens (p50/p99), errors, tokens, and quality (exact match and a
similarity score against the expected answers, and how often the two targets agree).

- `eval_set`: the JSONL file, parsed once (a line that cannot be used is an error naming it).
- `runner`: the requests, one streamed chat completion per prompt and target.
- `report`: pure figures and the markdown table from the runner's samples.
- `plot`: the PNG (matplotlib, from the `bench` extra).
"""
