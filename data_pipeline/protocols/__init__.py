"""Protocol texts of the benchmarks that both the library (RL rewards) and the evaluation need:
:mod:`~data_pipeline.protocols.eifbench` (EIFBench answer and yes/no judge prompts, verdict parser)."""
