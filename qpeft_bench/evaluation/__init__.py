"""Evaluation tasks. For now the held-out perplexity; lm-eval tasks plug in beside it."""
