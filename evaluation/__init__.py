"""iopo-jax evaluation: TRACE, EIFBench, IFEval and the offline demo set, with an LLM judge over any
OpenAI-compatible API (resumable, fault-tolerant) and markdown/PNG reports.

Entry points: ``python -m evaluation.run --config=configs/eval_{trace,eifbench,ifeval,demo}.py ...`` and
``python -m evaluation.compare RUN_A RUN_B``. Modules: :mod:`~evaluation.benchmark` (the ``Benchmark``
protocol and its registry), :mod:`~evaluation.trace`, :mod:`~evaluation.eifbench`,
:mod:`~evaluation.ifeval`, :mod:`~evaluation.demo` (its implementations: data, prompts, judging,
metrics), :mod:`~evaluation.runner` (runs any registered benchmark), :mod:`~evaluation.driver`
(resumable generation/judging loops), :mod:`~evaluation.generate` (predictions file, API and
JAX-sampler backends), :mod:`~evaluation.report`, :mod:`~evaluation.config_defaults` (documented
config fields). The chat client is :mod:`iopo_jax.chat_client`; the EIFBench protocol texts, shared
with the RL judge reward, are :mod:`data_pipeline.protocols.eifbench`.

Nothing in ``iopo_jax`` imports this package.
"""
