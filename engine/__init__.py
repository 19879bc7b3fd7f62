"""The machinery that runs the ideas of grpo.py, rlsd.py and distill.py: the rollout batch,
the teachers and the scoring of a response, each algorithm's loss, the update, prompts,
rewards, options, checkpoints, distributed helpers. The embedded world (toy tasks, tiny
models, the warm start) is engine/toy/."""
