"""CTC decoding: greedy, beam search with an n-gram LM, and the LM estimator."""
