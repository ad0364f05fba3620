"""The OpenAI-compatible judge client lives in :mod:`iopo_jax.judge` (the RL rewards use it and the
library may not import this package); re-exported here so ``from evaluation import judge`` keeps working."""
from iopo_jax.judge import *  # noqa: F401,F403
from iopo_jax.judge import BudgetExhaustedError, ChatClient, ChatError, ClientConfig  # noqa: F401
