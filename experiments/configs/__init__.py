"""One config per method (``experiments/configs/<method>.py``), all built on :mod:`experiments.configs.common`."""
METHODS = ("base", "sft", "dpo", "iopo", "iopo_star", "iopo_no_input", "iopo_no_output", "grpo", "segpo")
PREFERENCE_METHODS = ("sft", "dpo", "iopo", "iopo_star", "iopo_no_input", "iopo_no_output")
RL_METHODS = ("grpo", "segpo")


def get_method_config(method: str, budget: dict, model_dir: str, data_dir: str, lr: float, seed: int):
    """The training config of ``method`` (None for ``base``, which is not trained)."""
    import importlib  # pylint: disable=import-outside-toplevel

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    mod = importlib.import_module(f"experiments.configs.{method}")
    return mod.get_config(budget, model_dir, data_dir, lr, seed)
