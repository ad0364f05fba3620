"""iopo-jax evaluation: TRACE, EIFBench and the offline demo set, with an LLM judge over any
OpenAI-compatible API (resumable, fault-tolerant) and markdown/PNG reports.

Entry points: ``python -m evaluation.run --config=configs/eval_{trace,eifbench,demo}.py ...`` and
``python -m evaluation.compare RUN_A RUN_B``. Modules: :mod:`iopo_jax.chat_client` (chat client: retries,
budget, response store, usage/cost), :mod:`~evaluation.driver` (resumable generation/judging loops),
:mod:`~evaluation.generate` (predictions file, API and JAX-sampler backends), :mod:`~evaluation.trace`,
:mod:`~evaluation.eifbench`, :mod:`~evaluation.demo` (protocols and metrics), :mod:`~evaluation.report`,
:mod:`~evaluation.runner` (the run itself), :mod:`~evaluation.config_defaults` (documented config fields).

Nothing in ``iopo_jax`` imports this package.
"""
