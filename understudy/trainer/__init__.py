"""The RL trainer: tasks with verifiable rewards, GRPO algorithms, rollouts through the engine, and the
tiny-policy pretraining recipe. Knows nothing about HTTP (docs/design.md)."""
