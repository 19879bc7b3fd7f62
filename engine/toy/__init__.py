"""The embedded world that makes every algorithm runnable offline: the arithmetic and shapes
tasks with their careless demonstrators, the tiny Qwen3 and Qwen3-VL, and their warm start."""
