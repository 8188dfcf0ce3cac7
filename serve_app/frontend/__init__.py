"""The front end of the token-in/token-out engine: text, once per request, off the step thread.

`output_processor.py` turns a request into the engine's sequences (n > 1 fanned out) and the
engine's token outputs back into text deltas (detokenizing, stop strings, n > 1 merged);
`detokenizer.py` is one sequence's incremental detokenizer. The ingress, the in-process server
and the offline LLM all use this one processor (vLLM v1's OutputProcessor).
"""
